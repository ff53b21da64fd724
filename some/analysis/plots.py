"""Pictures of a run and of a study: expert usage, the key store, variant comparisons.

Every function draws on its own ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, so no
global state, no window, and a notebook's backend is left alone), writes a PNG atomically, and
returns its path::

    usage_histogram(counts, "runs/a4/usage_hist.png", title="A4, layer 5")
    keystore_umap(keys, counts, "runs/a4/keystore_umap.png")
    comparison_bars({"softmax": 12.1, "sigmoid": 12.9}, "study/ppl.png", errors={...}, best="min")

matplotlib and (for :func:`keystore_umap`) umap-learn are imported lazily: ``import some`` stays fast.
"""
from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..files import PathLike, atomic_write
from .metrics import as_counts, entropy_bits, experts_used, gini, max_entropy_bits

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["COLOR_BEST", "COLOR_UNUSED", "COLOR_USED", "MIN_UMAP_POINTS", "comparison_bars",
           "keystore_umap", "label_heatmap", "new_figure", "perplexity_plot", "save_figure", "umap_2d", "usage_grid",
           "usage_histogram"]

MIN_UMAP_POINTS = 8  # below this a 2-D UMAP of a k-NN graph says nothing; PCA is shown instead
COLOR_USED = "#3b6fb6"
COLOR_UNUSED = "#d62728"
COLOR_BEST = "#2ca02c"


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike) -> Path:
    """Write the PNG atomically: a report never links a half-written picture."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150))


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _usage_line(c: np.ndarray) -> str:
    return (f"N={c.size}, Gini={gini(c):.3f}, entropy={entropy_bits(c):.2f}/{max_entropy_bits(c.size):.2f} bits, "
            f"used {experts_used(c)}")


def _readable_log_axis(axis, lo: float, hi: float) -> None:
    """Over a few decades matplotlib labels a log axis's minor ticks ("2×10^2 3×10^2 ...")
    until they overlap; plain numbers at 1-2-5 steps read better there. Within one decade
    every labelled tick is plain; wider ranges keep only the 10^k labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:.3g}")
    if hi / lo < 20:
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    elif hi / lo < 1e4:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())
    else:
        axis.set_minor_formatter(NullFormatter())


# --------------------------------------------------------------------------- usage histogram
def usage_histogram(counts, path: PathLike, title: str = "Expert usage", *, unit: str = "tokens") -> Path:
    """Expert usage counts (one per expert) as a PNG with two panels on a log count axis.

    Left: how many experts received how many ``unit`` (log-spaced bins on a log x axis, so a
    range of several orders of magnitude stays readable); experts with 0 cannot sit on a log axis,
    so their number is written in the panel and in the legend. A dashed line marks the count of
    perfectly balanced routing (``Σ c / N``). Right: the counts sorted by rank (log y), where
    imbalance and dead experts (red ticks) show at a glance. The title carries N, Gini and entropy.
    """
    c = as_counts(counts)
    n, total = c.size, c.sum()
    positive = c[c > 0]
    n_zero = n - positive.size
    fig = new_figure(11, 4.2)
    ax_hist, ax_rank = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    fig.suptitle(f"{title}\n{_usage_line(c)}", fontsize=11)
    uniform = total / n

    if positive.size:
        lo, hi = positive.min(), positive.max()
        if hi / lo < 1.5:
            # (nearly) equal counts: a range around them, with an odd number of bins so that
            # the counts fall in the middle of one bar rather than on an edge
            lo, hi, n_bins = lo / 2, hi * 2, 9
        else:
            n_bins = int(np.clip(np.sqrt(positive.size) * 2, 8, 40))
        bins = np.geomspace(lo, hi * 1.0001, num=n_bins + 1)
        heights, _, _ = ax_hist.hist(positive, bins=bins, color=COLOR_USED, edgecolor="white", linewidth=0.5,
                                     label=f"used experts ({positive.size})")
        ax_hist.set_xscale("log")
        _readable_log_axis(ax_hist.xaxis, lo, hi)
        ax_hist.axvline(uniform, color="black", linestyle="--", linewidth=1, label=f"balanced share ({uniform:,.4g})")
        ax_hist.yaxis.get_major_locator().set_params(integer=True)
        ax_hist.set_ylim(0, max(heights) * 1.45)  # headroom: the legend and the note sit above the bars
        ax_hist.legend(fontsize=8, loc="upper left", frameon=False)
    else:
        ax_hist.set_xticks([])
        ax_hist.set_yticks([])
    if n_zero:
        ax_hist.text(0.98, 0.95, f"{n_zero} of {n} experts unused\n(0 {unit}, not on the log axis)",
                     transform=ax_hist.transAxes, ha="right", va="top", fontsize=9, color=COLOR_UNUSED,
                     bbox=dict(boxstyle="round", facecolor="white", edgecolor=COLOR_UNUSED, alpha=0.9))
    ax_hist.set_xlabel(f"{unit} routed to an expert (log scale)")
    ax_hist.set_ylabel("number of experts")
    ax_hist.set_title("distribution of per-expert counts", fontsize=10)

    order = np.sort(c)[::-1]
    ranks = np.arange(1, n + 1)
    if positive.size:
        ax_rank.bar(ranks[: positive.size], order[: positive.size], width=1.0, color=COLOR_USED, linewidth=0)
        ax_rank.set_yscale("log")
        ax_rank.axhline(uniform, color="black", linestyle="--", linewidth=1, label="balanced share")
        ax_rank.set_ylim(bottom=positive.min() / 2, top=positive.max() * 4)
        _readable_log_axis(ax_rank.yaxis, positive.min() / 2, positive.max() * 4)
    else:
        ax_rank.set_yticks([])
        ax_rank.text(0.5, 0.5, f"no {unit} routed:\nall {n} experts unused", transform=ax_rank.transAxes,
                     ha="center", va="center", fontsize=11, color=COLOR_UNUSED)
    if n_zero and positive.size:
        # dead experts: ticks along the bottom edge, in axes coordinates (0 has no place on a log axis)
        ax_rank.plot(ranks[positive.size:], np.zeros(n_zero), "|", color=COLOR_UNUSED, markersize=12,
                     transform=ax_rank.get_xaxis_transform(), clip_on=False, label=f"unused ({n_zero})")
    if positive.size:
        ax_rank.legend(fontsize=8, loc="upper right", frameon=False)
    ax_rank.set_xlim(0.5, n + 0.5)
    ax_rank.xaxis.get_major_locator().set_params(integer=True)
    ax_rank.set_xlabel("expert rank (most used first)")
    ax_rank.set_ylabel(f"{unit} (log scale)")
    ax_rank.set_title("per-expert counts by rank", fontsize=10)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- key store picture
def _pca_2d(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    if not np.any(x):
        return np.zeros((x.shape[0], 2))
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    s = np.where(s > s[0] * 1e-9, s, 0.0)  # rounding noise in a missing dimension (e.g. N = 2) is 0
    out = np.zeros((x.shape[0], 2))
    k = min(2, s.size)
    out[:, :k] = u[:, :k] * s[:k]
    return out


def keystore_umap(keys, usage, path: PathLike, title: str = "Key store", *, n_neighbors: int = 15,
                  min_dist: float = 0.1, random_state: int = 0, method: str = "auto") -> Path:
    """A 2-D UMAP (umap-learn, cosine metric, fixed ``random_state``) of the key store ``keys``
    (``N x d``), one point per expert, colored by ``usage`` (``N`` counts; log color scale; unused
    experts as red crosses). ``usage=None`` draws all points in one color.

    ``n_neighbors`` is reduced to ``N − 1`` when needed. For ``N < MIN_UMAP_POINTS``, with
    ``method="pca"``, when umap-learn is missing, or when UMAP fails on degenerate keys, the picture
    is a PCA of the normalized keys instead, and the title says so. Works for any ``N >= 2``.
    """
    k = _to_numpy(keys)
    if k.ndim != 2 or k.shape[0] < 2 or k.shape[1] < 1:
        raise ValueError(f"keys must be an N x d matrix with N >= 2, got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        raise ValueError("keys contain NaN or Inf")
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"method must be 'auto', 'umap' or 'pca', got {method!r}")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 2:
        raise ValueError(f"n_neighbors must be an int >= 2, got {n_neighbors!r}")
    n, d = k.shape
    u = None if usage is None else as_counts(usage)
    if u is not None and u.size != n:
        raise ValueError(f"usage has {u.size} entries but keys has {n} rows (one per expert)")
    # The cosine geometry of the keys is that of the unit vectors (the router scores by cosine).
    norms = np.linalg.norm(k, axis=1, keepdims=True)
    unit_keys = np.divide(k, norms, out=np.zeros_like(k), where=norms > 0)

    emb, how = None, None
    if method == "umap" or (method == "auto" and n >= MIN_UMAP_POINTS):
        nn = min(n_neighbors, n - 1)
        try:
            emb = umap_2d(k, nn, min_dist, random_state)
            how = f"UMAP (cosine, n_neighbors={nn}, min_dist={min_dist}, seed={random_state})"
            axis = "UMAP"
        except ImportError:
            warnings.warn("umap-learn is not installed (pip install umap-learn); drawing a PCA of the keys instead",
                          stacklevel=2)
            how = "PCA (umap-learn not installed)"
        except (ValueError, TypeError, np.linalg.LinAlgError) as e:  # degenerate keys, e.g. all equal
            warnings.warn(f"UMAP failed on these keys ({type(e).__name__}: {e}); drawing a PCA instead", stacklevel=2)
            how = "PCA (UMAP failed on these keys)"
    if emb is None:
        emb = _pca_2d(unit_keys)
        axis = "PC"
        how = how or (f"PCA of normalized keys (N={n} < {MIN_UMAP_POINTS}, too few for UMAP)"
                      if method == "auto" else "PCA of normalized keys")

    fig = new_figure(7, 6)
    ax = fig.add_subplot()
    subtitle = f"N={n}, d={d}; {how}"
    if u is not None:
        subtitle += f"\n{_usage_line(u)}"
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    size = float(np.clip(3000 / n, 12, 90))
    if u is None:
        ax.scatter(emb[:, 0], emb[:, 1], s=size, color=COLOR_USED, edgecolors="white", linewidths=0.4)
    else:
        from matplotlib.colors import LogNorm

        used = u > 0
        if used.any():
            lo, hi = u[used].min(), u[used].max()
            norm = LogNorm(vmin=lo if hi > lo else lo / 2, vmax=hi if hi > lo else hi * 2)
            sc = ax.scatter(emb[used, 0], emb[used, 1], c=u[used], norm=norm, cmap="viridis", s=size,
                            edgecolors="white", linewidths=0.4, label="used expert")
            cbar = fig.colorbar(sc, ax=ax, label="tokens routed to the expert (log scale)")
            _readable_log_axis(cbar.ax.yaxis, norm.vmin, norm.vmax)
        if (~used).any():
            ax.scatter(emb[~used, 0], emb[~used, 1], marker="x", color=COLOR_UNUSED, s=size * 0.8, linewidths=1.2,
                       label=f"unused expert ({int((~used).sum())})")
            ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    if axis == "UMAP":  # UMAP coordinates have no units: the ticks would only distract
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def umap_2d(x: np.ndarray, n_neighbors: int, min_dist: float, random_state: int) -> np.ndarray:
    # numba's OpenMP layer resets the process's OpenMP thread count (OMP_NUM_THREADS=1 becomes
    # the core count): PyTorch's thread count is restored, or training after a picture in the
    # same process would run on other threads and no longer reproduce bit for bit.
    threads = torch.get_num_threads()
    try:
        return _umap_2d(x, n_neighbors, min_dist, random_state)
    finally:
        torch.set_num_threads(threads)


def _umap_2d(x: np.ndarray, n_neighbors: int, min_dist: float, random_state: int) -> np.ndarray:
    import umap  # lazy: ~5 s to import (numba), and the first fit of a process JIT-compiles for ~20 s

    with warnings.catch_warnings():
        # the cosine metric has no inverse_transform gradient, and n_jobs=1 with a seed: both expected
        warnings.filterwarnings("ignore", message=".*gradient function is not yet implemented.*")
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine",
                            random_state=random_state, n_jobs=1,
                            # spectral initialization needs k < N eigenvectors; tiny N starts at random
                            init="spectral" if x.shape[0] > n_neighbors + 2 else "random")
        emb = reducer.fit_transform(x)
    if not np.all(np.isfinite(emb)):
        raise ValueError("UMAP produced non-finite coordinates")
    return np.asarray(emb, dtype=np.float64)


# --------------------------------------------------------------------------- study comparisons
def comparison_bars(values: Mapping[str, float], path: PathLike, *, errors: Mapping[str, float] | None = None,
                    ylabel: str = "", title: str = "", best: str | None = None, log_scale: bool = False,
                    fmt: str = "{:.3g}") -> Path:
    """One bar per variant (in the mapping's order) with its value written on it, optional error
    bars (``errors``: e.g. the std over seeds), and the best bar highlighted (``best="min"`` for
    perplexity, ``"max"`` for accuracy; None: no highlight). NaN values show as "n/a"."""
    if not values:
        raise ValueError("comparison_bars needs at least one variant")
    if best not in (None, "min", "max"):
        raise ValueError(f"best must be None, 'min' or 'max', got {best!r}")
    names = [str(k) for k in values]
    vals = np.array([float(v) for v in values.values()])
    errs = None
    if errors is not None:
        unknown = set(map(str, errors)) - set(names)
        if unknown:
            raise ValueError(f"errors has variants that values lacks: {sorted(unknown)}")
        errs = np.array([float(errors.get(k, np.nan)) for k in values])
        if np.any(errs[np.isfinite(errs)] < 0):
            raise ValueError("errors must be non-negative")
    finite = np.isfinite(vals)
    if log_scale and np.any(vals[finite] <= 0):
        raise ValueError("log_scale needs positive values")

    fig = new_figure(max(4.5, 0.8 * len(names) + 2), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    colors = [COLOR_USED] * len(names)
    if best is not None and finite.any():
        i_best = int(np.nanargmin(np.where(finite, vals, np.nan)) if best == "min"
                     else np.nanargmax(np.where(finite, vals, np.nan)))
        colors[i_best] = COLOR_BEST
    heights = np.where(finite, vals, 0.0)
    yerr = None if errs is None else np.where(np.isfinite(errs), errs, np.nan)  # NaN: no error bar drawn
    bars = ax.bar(x, heights, yerr=yerr, capsize=4 if errs is not None else 0, color=colors,
                  error_kw=dict(elinewidth=1, ecolor="black"))
    if log_scale:
        ax.set_yscale("log")
    for i, (bar, v) in enumerate(zip(bars, vals, strict=True)):
        if not finite[i]:
            ax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, color="gray")
            continue
        label = fmt.format(v) + ("" if errs is None or not np.isfinite(errs[i]) else f" ± {fmt.format(errs[i])}")
        top = v + (yerr[i] if yerr is not None and v >= 0 and np.isfinite(yerr[i]) else 0)
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 or max(map(len, names)) > 10 else 0,
                  ha="right" if len(names) > 4 or max(map(len, names)) > 10 else "center")
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    ax.set_ylabel(ylabel)
    full_title = title
    if best is not None:
        full_title += f"{chr(10) if title else ''}(green: best, {'lowest' if best == 'min' else 'highest'})"
    ax.set_title(full_title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return save_figure(fig, path)


# ----------------------------------------------------------- study comparisons


def perplexity_plot(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """ID and OOD perplexity per variant side by side: one dot per run (seed)
    and the mean with ± std whiskers; the axes zoom to the data, since
    variants often differ by a few percent."""
    names = list(runs)
    fig = new_figure(max(7.0, 1.4 * len(names) + 3), 4.2)
    for ax, metric, what in zip(fig.subplots(1, 2), ("id_perplexity", "ood_perplexity"), ("ID", "OOD"), strict=True):
        means = []
        for i, v in enumerate(names):
            vals = np.array([r[metric] for r in runs[v]], dtype=np.float64)
            if vals.size == 0:
                means.append(math.nan)
                continue
            jitter = np.linspace(-0.12, 0.12, vals.size) if vals.size > 1 else np.zeros(1)
            ax.scatter(i + jitter, vals, s=14, color=COLOR_USED, alpha=0.6, zorder=2)
            std = vals.std(ddof=1) if vals.size > 1 else 0.0
            ax.errorbar(i, vals.mean(), yerr=std, fmt="_", color="black", markersize=18, capsize=5, zorder=3)
            means.append(float(vals.mean()))
        if np.isfinite(means).any():
            best = int(np.nanargmin(means))
            ax.axhline(means[best], color=COLOR_BEST, linestyle="--", linewidth=1, label=f"best mean: {names[best]}")
            ax.legend(fontsize=7, loc="best")
        rotate = len(names) > 4 or max(map(len, names)) > 10
        ax.set_xticks(range(len(names)), names, rotation=30 if rotate else 0, ha="right" if rotate else "center",
                      fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(f"{what} perplexity (lower is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{what}: dots = seeds, black = mean ± std", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def usage_grid(counts: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Expert usage of several variants side by side: per variant the usage
    counts sorted from most to least used (log scale), unused experts as red
    ticks on the axis, with Gini, entropy and experts used in the panel title."""
    n = len(counts)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = new_figure(4.2 * cols, 3.2 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
    positive = [c[c > 0] for c in counts.values() if np.any(c > 0)]
    top = max(float(c.max()) for c in positive) if positive else 1.0
    bottom = min(float(c.min()) for c in positive) if positive else 1.0
    for ax, (name, c) in zip(axes, counts.items(), strict=False):  # spare axes are hidden below
        order = np.sort(c)[::-1]
        x = np.arange(1, c.size + 1)
        used = order > 0
        ax.bar(x[used], order[used], width=1.0, color=COLOR_USED, edgecolor="none")
        if (~used).any():
            ax.plot(x[~used], np.full((~used).sum(), bottom / 1.6), "|", color=COLOR_UNUSED, markersize=8,
                    label=f"unused: {(~used).sum()}")
            ax.legend(loc="upper right", fontsize=7)
        ax.axhline(c.sum() / c.size, color=COLOR_BEST, linestyle="--", linewidth=1)  # balanced routing
        ax.set_yscale("log")
        ax.set_ylim(bottom / 2.5, top * 1.6)
        ax.set_title(f"{name}\nGini {gini(c):.3f}, H {entropy_bits(c):.2f} bits, used {experts_used(c)}", fontsize=9)
        ax.set_xlabel("expert (by usage rank)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[:: cols]:
        ax.set_ylabel("selections (log)", fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\n(dashed: balanced routing, Σc / N)", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------- specialization
def label_heatmap(matrix, labels: list[str], path: PathLike, title: str = "", *, what: str = "topic") -> Path:
    """Experts x labels (topics, token classes): each expert's row normalized to the
    share of its pairs per label, experts sorted by their dominant label (then by
    that share), so specialized experts form a staircase. Experts with no pairs are
    left out (their number is in the title)."""
    m = _to_numpy(matrix)
    if m.ndim != 2 or m.shape[1] != len(labels):
        raise ValueError(f"label_heatmap: matrix must be (experts, {len(labels)} labels), got {m.shape}")
    rows = m.sum(axis=1)
    used = np.nonzero(rows > 0)[0]
    share = m[used] / rows[used, None] if used.size else np.zeros((0, len(labels)))
    dominant = share.argmax(axis=1) if used.size else np.zeros(0, dtype=np.int64)
    order = np.lexsort((-share.max(axis=1) if used.size else np.zeros(0), dominant))
    share, experts = share[order], used[order]
    n_rows, n_cols = max(len(experts), 1), len(labels)
    width = max(7.5, min(4.5 + 0.22 * n_cols, 16))
    fig = new_figure(width, min(3.6 + 0.09 * n_rows, 10))
    ax = fig.subplots()
    mesh = ax.imshow(share if len(experts) else np.zeros((1, n_cols)), aspect="auto", cmap="magma_r", vmin=0,
                     vmax=1, interpolation="nearest")
    fig.colorbar(mesh, ax=ax, pad=0.01).set_label("share of the expert's pairs", fontsize=8)
    ax.set_xticks(range(n_cols), labels, rotation=90 if n_cols > 8 else 0, fontsize=7 if n_cols > 20 else 8)
    ax.set_xlabel(what)
    ax.set_ylabel("expert", fontsize=9)
    if len(experts) <= 40:
        ax.set_yticks(range(len(experts)), [str(e) for e in experts], fontsize=6)
    else:
        ax.set_yticks([])
    unused = m.shape[0] - used.size
    col = m.sum(axis=0)
    base = col / col.sum() if col.sum() else col
    purity = float(m.max(axis=1).sum() / m.sum()) if m.sum() else 0.0
    note = (f"rows: experts sorted by dominant {what}; {used.size} with pairs ({unused} without); purity "
            f"{purity:.2f} (largest {what}: {100 * base.max() if base.size else 0:.0f}% of all pairs)")
    wrap = int(width * 13)  # characters per line at this font size
    ax.set_title("\n".join(textwrap.wrap(title, wrap) + textwrap.wrap(note, wrap)), fontsize=9)
    return save_figure(fig, path)
