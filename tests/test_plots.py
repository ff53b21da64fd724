"""Tests of some.plots: every picture is a non-empty PNG that matplotlib reads back, for normal
and edge cases; bad input raises before anything is written; and the drawn figures show their
data (bar heights, log axes, colors by count, unused experts marked, clusters apart, the best bar).

One test runs the real UMAP (umap-learn JIT-compiles for ~20 s on its first fit in a process);
the others use the PCA path or a stand-in UMAP to stay fast.
"""
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from some.analysis import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 5000, "PNG missing or suspiciously small"
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert not list(path.parent.glob(".*.png")), "temporary file left behind"
    return img


def unit_keys(n, d=32, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ----------------------------------------------------------------------------- usage histogram
@pytest.mark.parametrize("counts", [
    pytest.param(np.r_[np.zeros(5), np.round(np.random.default_rng(0).lognormal(7, 1.2, 59))], id="N64-some-unused"),
    pytest.param(torch.zeros(64, dtype=torch.long), id="all-zero"),
    pytest.param([10, 10], id="N2-equal"),
    pytest.param([0, 3], id="N2-one-unused"),
    pytest.param(torch.rand(512, dtype=torch.float64) * 1e5, id="N512-float"),
])
def test_usage_histogram_writes_png(tmp_path, counts):
    out = P.usage_histogram(counts, tmp_path / "sub" / "hist.png", title="layer 5")
    assert out == tmp_path / "sub" / "hist.png"  # the parent folder is created
    read_png(out)


def test_usage_histogram_rejects_bad_counts(tmp_path):
    for bad in ([], [1, -2], [[1, 2]], [np.nan, 1]):
        with pytest.raises(ValueError):
            P.usage_histogram(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_usage_histogram_overwrites_atomically(tmp_path):
    path = tmp_path / "h.png"
    P.usage_histogram([1, 2, 3], path)
    first = path.read_bytes()
    P.usage_histogram([100, 0, 3], path)
    assert path.read_bytes() != first
    read_png(path)


# ----------------------------------------------------------------------------- key store picture
@pytest.mark.parametrize("n, usage", [
    (2, [3, 0]),
    (2, None),
    (5, [0, 0, 0, 0, 0]),
    (7, torch.arange(7)),
])
def test_keystore_small_n_uses_pca(tmp_path, n, usage):
    read_png(P.keystore_umap(unit_keys(n), usage, tmp_path / "ks.png"))


def test_keystore_pca_method_and_degenerate_keys(tmp_path):
    read_png(P.keystore_umap(unit_keys(64), np.arange(64), tmp_path / "pca.png", method="pca"))
    same = torch.ones(10, 4)  # all keys equal: PCA has nothing to show, must still draw
    read_png(P.keystore_umap(same, None, tmp_path / "same.png", method="pca"))


def test_keystore_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="N >= 2"):
        P.keystore_umap(torch.randn(1, 8), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="N x d"):
        P.keystore_umap(torch.randn(8), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        P.keystore_umap(torch.full((4, 3), float("nan")), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="usage has 3 entries"):
        P.keystore_umap(torch.randn(4, 3), [1, 2, 3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="method"):
        P.keystore_umap(torch.randn(4, 3), None, tmp_path / "x.png", method="tsne")
    with pytest.raises(ValueError, match="n_neighbors"):
        P.keystore_umap(torch.randn(4, 3), None, tmp_path / "x.png", n_neighbors=1)
    assert not (tmp_path / "x.png").exists()


class _FakeUMAP:
    """Stands in for umap.UMAP: records its arguments, returns a fixed layout."""

    calls = []

    def __init__(self, **kwargs):
        _FakeUMAP.calls.append(kwargs)

    def fit_transform(self, x):
        return np.random.default_rng(0).normal(size=(x.shape[0], 2))


def test_keystore_umap_arguments(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_FakeUMAP))
    _FakeUMAP.calls.clear()
    read_png(P.keystore_umap(unit_keys(10), np.arange(10), tmp_path / "a.png", random_state=7))
    read_png(P.keystore_umap(unit_keys(64), np.arange(64), tmp_path / "b.png"))
    small, normal = _FakeUMAP.calls
    assert small["n_neighbors"] == 9  # reduced to N - 1 (UMAP needs n_neighbors < N)
    assert small["metric"] == "cosine" and small["random_state"] == 7
    assert normal["n_neighbors"] == 15 and normal["random_state"] == 0 and normal["init"] == "spectral"


def test_keystore_falls_back_to_pca_when_umap_fails(tmp_path, monkeypatch):
    class Broken(_FakeUMAP):
        def fit_transform(self, x):
            raise ValueError("degenerate graph")

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=Broken))
    with pytest.warns(UserWarning, match="UMAP failed.*degenerate graph"):
        read_png(P.keystore_umap(unit_keys(16), None, tmp_path / "f.png"))
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` fails: umap-learn not installed
    with pytest.warns(UserWarning, match="umap-learn is not installed"):
        read_png(P.keystore_umap(unit_keys(16), None, tmp_path / "g.png"))


@pytest.mark.slow
def test_keystore_real_umap_n64_is_deterministic(tmp_path):
    pytest.importorskip("umap")
    keys = unit_keys(64, d=128).numpy()
    usage = np.r_[np.zeros(4), np.arange(1, 61) ** 2]
    read_png(P.keystore_umap(keys, usage, tmp_path / "umap.png", title="A4, layer 5"))
    a = P.umap_2d(keys, 15, 0.1, 0)  # fixed random_state -> the same picture every time
    b = P.umap_2d(keys, 15, 0.1, 0)
    assert a.shape == (64, 2) and np.array_equal(a, b)


@pytest.mark.slow
def test_umap_leaves_the_torch_thread_count_alone(monkeypatch):
    """numba's OpenMP layer resets the OpenMP thread count; a training after a picture in the same
    process must run on the threads it had (or it no longer reproduces bit for bit)."""
    pytest.importorskip("umap")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        P.umap_2d(unit_keys(32, d=16).numpy(), 5, 0.1, 0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- comparison bars
def test_comparison_bars(tmp_path):
    values = {"softmax": 12.1, "sigmoid": 12.9, "relu": float("nan"), "avg_k": 13.4, "top_p": 12.5}
    read_png(P.comparison_bars(values, tmp_path / "ppl.png", errors={"softmax": 0.2, "sigmoid": 0.4},
                               ylabel="val perplexity", title="gating", best="min"))
    read_png(P.comparison_bars({"a": 1e-3, "b": 10.0}, tmp_path / "log.png", log_scale=True, best="max"))
    read_png(P.comparison_bars({"only": -0.5}, tmp_path / "neg.png"))


@pytest.mark.parametrize("kw, match", [
    (dict(values={}), "at least one"),
    (dict(values={"a": 1.0}, errors={"b": 0.1}), "lacks"),
    (dict(values={"a": 1.0}, errors={"a": -0.1}), "non-negative"),
    (dict(values={"a": 1.0}, best="best"), "best"),
    (dict(values={"a": 0.0}, log_scale=True), "positive"),
])
def test_comparison_bars_rejects_bad_input(tmp_path, kw, match):
    values = kw.pop("values")
    with pytest.raises(ValueError, match=match):
        P.comparison_bars(values, tmp_path / "x.png", **kw)


def test_import_is_lazy():
    # `import some.plots` must not pay for matplotlib or umap (numba): ~5 s at import time
    code = "import sys, some.analysis.plots; print('matplotlib' in sys.modules, 'umap' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["False", "False"]


# ----------------------------------------------------------------------------- what the pictures show
@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, captured before they are saved."""
    figures = []

    def keep(fig, path):
        figures.append(fig)
        return path
    monkeypatch.setattr(P, "save_figure", keep)
    return figures


def test_usage_histogram_shows_the_counts_on_log_axes(tmp_path, drawn):
    counts = [0, 0, 5, 50, 500, 5000]
    P.usage_histogram(counts, tmp_path / "h.png", title="layer 5")
    (fig,) = drawn
    hist, rank = fig.axes
    assert "layer 5" in fig.get_suptitle() and "Gini" in fig.get_suptitle()
    # left: every used expert sits in one bar; the unused ones are named, not drawn
    assert hist.get_xscale() == "log" and sum(p.get_height() for p in hist.patches) == 4
    assert any("2 of 6 experts unused" in t.get_text() for t in hist.texts)
    # right: the used experts' counts by rank, most used first, on a log axis, with the balanced share
    assert rank.get_yscale() == "log"
    assert [p.get_height() for p in rank.patches] == [5000, 500, 50, 5]
    balanced = [ln for ln in rank.lines if ln.get_linestyle() == "--"]
    assert balanced and balanced[0].get_ydata()[0] == pytest.approx(sum(counts) / 6)
    ticks = [ln for ln in rank.lines if ln.get_marker() == "|"]  # the dead experts
    assert ticks and list(ticks[0].get_xdata()) == [5, 6]


def test_keystore_picture_places_and_colors_each_expert(tmp_path, drawn):
    # two tight clusters of keys: the picture must put them apart, color the used experts by
    # their counts and mark the unused ones
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=1)
    keys = torch.cat([centers[0] + 0.01 * torch.randn(4, 16, generator=g),
                      centers[1] + 0.01 * torch.randn(4, 16, generator=g)])
    usage = [10, 20, 30, 40, 0, 0, 70, 80]
    P.keystore_umap(keys, usage, tmp_path / "k.png", method="pca")
    (fig,) = drawn
    ax = fig.axes[0]
    used, unused = ax.collections[:2]
    assert list(used.get_array()) == [10, 20, 30, 40, 70, 80]  # the colors are the counts
    assert len(unused.get_offsets()) == 2 and "unused expert (2)" in [t.get_text() for t in ax.get_legend().texts]
    points = np.concatenate([used.get_offsets()[:4], unused.get_offsets(), used.get_offsets()[4:]])
    first, second = points[:4, 0], points[4:, 0]  # PC 1 separates the clusters
    assert first.max() < second.min() or second.max() < first.min()
    assert "N=8, d=16" in ax.get_title() and "PCA" in ax.get_title()


def test_comparison_bars_draw_the_values_errors_and_best(tmp_path, drawn):
    P.comparison_bars({"softmax": 12.1, "sigmoid": 12.9, "relu": float("nan"), "avg_k": 11.4},
                      tmp_path / "b.png", errors={"softmax": 0.2}, best="min")
    ax = drawn[0].axes[0]
    bars = ax.patches
    assert [round(b.get_height(), 6) for b in bars] == [12.1, 12.9, 0.0, 11.4]  # n/a draws no bar
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["12.1 ± 0.2", "12.9", "n/a", "11.4"]
    colors = [b.get_facecolor() for b in bars]
    assert colors[3] != colors[0] and colors[0] == colors[1]  # the lowest is highlighted
    assert [t.get_text() for t in ax.get_xticklabels()] == ["softmax", "sigmoid", "relu", "avg_k"]
