"""Regression tests of the hardening issue: one test per finding of the fuzz
campaign (the raw dispatcher ops, numerics, training, validation, checkpoints,
run directories, files), each failing before the fix."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ENV
from inputs import make_experts, make_route_inputs, random_routing

from some import ops
from some.cli import main as cli_main
from some.engine import load_checkpoint, save_checkpoint
from some.errors import CheckpointError, ConfigError, RunDirError, StudyError, TrainingDiverged
from some.runs import Trainer, apply_overrides, get_preset
from some.studies import load_study

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv, code=None):
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and (code is None or rc == code), (rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("some: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------- 1-3: raw ops


def test_1_route_backward_checks_its_indices():
    q, K = torch.randn(4, 8), torch.randn(6, 8)
    routed, G, S = ops.route(q, K, 2, 0.8)
    thr = torch.zeros(6)
    for bad in (1 << 40, 7, -2):
        idx = routed.clone()
        idx[0, 0] = bad
        for gating, th in (("softmax", None), ("top_any", thr)):
            with pytest.raises(IndexError, match=r"indices must be in -1\.\.N-1 = -1\.\.5"):
                torch.ops.some.route_backward(torch.ones_like(G), torch.ones_like(S), q, K, idx, G, S, 0.8,
                                              gating, "cosine", th, None)
    with pytest.raises(ValueError, match="'indices' has shape"):
        torch.ops.some.route_backward(torch.ones_like(G), torch.ones_like(S), q, K, routed[:2], G, S, 0.8,
                                      "softmax", "cosine", None, None)
    # the heap is intact: a valid call afterwards works
    x = torch.randn(10, 8)
    w = make_experts(4, 8, 16, torch.float32)
    idx, gates = random_routing(10, 4, 2, torch.float32)
    assert torch.isfinite(ops.experts(x, idx, gates, *w)).all()


def test_2_experts_backward_checks_shapes_and_grouping():
    T, d, N, h, k = 40, 8, 5, 12, 2
    x = torch.randn(T, d)
    idx, gates = random_routing(T, N, k, torch.float32)
    w1, b1, w2, b2 = make_experts(N, d, h, torch.float32)
    y, hidden, order, offsets = torch.ops.some.experts(x, idx, gates, w1, b1, w2, b2)
    gy = torch.randn(T, d)
    args = (gy, idx, gates, w1, w2, b2, hidden, order, offsets, True, True)
    with pytest.raises(ValueError, match="'gates' has shape"):
        torch.ops.some.experts_backward(gy, idx, torch.ones(1, 1), w1, w2, b2, hidden, order, offsets, True, True)
    with pytest.raises(ValueError, match="'b2' has shape"):
        torch.ops.some.experts_backward(gy, idx, gates, w1, w2, b2.reshape(-1)[:1].reshape(1, 1), hidden, order,
                                        offsets, True, True)
    for broken in (order.flip(0), torch.zeros_like(order), order.clamp(max=3)):
        with pytest.raises(ValueError, match="not the grouping of these indices"):
            torch.ops.some.experts_backward(*args[:7], broken, offsets, True, True)
    bad_off = offsets.clone()
    bad_off[2] = 10**6
    with pytest.raises(ValueError, match="not the grouping"):
        torch.ops.some.experts_backward(*args[:8], bad_off, True, True)
    gx, gg = torch.ops.some.experts_backward(*args)  # the real grouping still works
    assert torch.isfinite(gx).all() and torch.isfinite(gg).all()


def test_3_meta_and_fake_calls_check_like_the_kernels():
    T, d, N, h, k = 6, 4, 3, 5, 2
    x = torch.randn(T, d)
    idx, gates = random_routing(T, N, k, torch.float32)
    w1, b1, w2, b2 = make_experts(N, d, h, torch.float32)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.some.experts(x, idx, gates, w1.to("meta"), b1, w2, b2)
    q = torch.randn(T, d)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.some.keystore_stats(q.to("meta"), idx, gates, N)
    qm, Km = q.to("meta"), torch.randn(N, d, device="meta")
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.some.route(qm, Km, 2, 0.0)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        torch.ops.some.route(qm.int(), Km, 2, 0.8)
    with pytest.raises(ValueError, match="active"):
        torch.ops.some.route(qm, Km, 2, 0.8, "softmax", "cosine", 0.4, None, torch.ones(7, dtype=torch.bool,
                                                                                       device="meta"))
    with pytest.raises(ValueError, match="thresholds"):
        torch.ops.some.route(qm, Km, 2, 0.8, "top_any")


# ----------------------------------------------------------- 4: divergence


def test_4_a_non_finite_router_output_stops_with_the_diverged_line(tmp_path):
    config = apply_overrides(get_preset("tiny-test"), ["epochs=1", f"cache_dir={tmp_path}"])
    trainer = Trainer(config, tmp_path / "run", progress=False, echo=False)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output  # the third forward: step 3

    trainer.model.some_layers()[1].router.net.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"training diverged: the router's output is not finite .* at step 3"):
        trainer.run(make_plots=False)


def test_4_resuming_a_non_finite_checkpoint_is_refused(tmp_path):
    config = apply_overrides(get_preset("tiny-test"), ["epochs=1", f"cache_dir={tmp_path}"])
    Trainer(config, tmp_path / "run", progress=False, echo=False).run(make_plots=False)
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    state["model"]["embed.weight"][0, 0] = float("nan")
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=r"NaN or Inf in model 'embed.weight'.*cannot be resumed"):
        Trainer(None, tmp_path / "run", resume=True, progress=False, echo=False)


# ------------------------------------------------------------- 5: numerics


def test_5_tiny_temperatures_are_refused():
    q, K, _ = make_route_inputs(4, 8, 6, torch.float32)
    for backend in ("native", "torch"):
        with ops.use_backend(backend), pytest.raises(ValueError, match="smallest normal float32"):
            ops.route(q, K, 2, 1e-39)
    r = ops.route(q, K, 2, 1.2e-38)  # just above the floor: finite gates
    assert torch.isfinite(r.gates).all()
    with pytest.raises(ConfigError, match="temperature"):
        apply_overrides(get_preset("tiny-test"), ["temperature=1e-40"])


# ---------------------------------------------------------- 6: validation


@pytest.mark.parametrize("override", ["alpha=nan", "beta=inf", "weight_decay=nan", "delta=1e300", "grad_clip=nan",
                                      "vocab_size=1e9", "seed=1e30", "learning_rate=1e6", "num_experts=1e30",
                                      "top_p=nan", "dist_timeout=inf", "epochs=1e12", "adaptive_threshold=nan"])
def test_6_absurd_values_are_one_line_config_errors(override, capsys):
    with pytest.raises(ConfigError):
        apply_overrides(get_preset("tiny-test"), [override])
    _one_line_error(capsys, ["train", "--preset", "tiny-test", "--set", override, "--out", "/nonexistent/x"], 2)


def test_6_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, capsys):
    line = _one_line_error(capsys, ["train", "--preset", "tiny-test", "--set", "d_model=1000000000", "n_heads=1",
                                    f"cache_dir={tmp_path}", "--out", str(tmp_path / "r")], 2)
    assert "GiB" in line and "reduce d_model" in line


@pytest.mark.parametrize("change, message", [
    ({"set": {"alpha": float("nan")}}, "alpha"),
    ({"variants": {"a": {"num_experts": 1e30}}}, "num_experts"),
    ({"seeds": [2**70]}, r"integers in 0\.\.4294967295"),
    ({"datasets": [{"name": "x" * 300, "data_source": "synthetic", "ood_source": "synthetic:50"}]}, "1..100"),
])
def test_6_study_validation(tmp_path, change, message):
    study = {"study": "s", "preset": "tiny-test", "set": {}, "seeds": [0],
             "datasets": [{"name": "synth", "data_source": "synthetic", "ood_source": "synthetic:50"}],
             "variants": {"a": {}}}
    study.update(change)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(StudyError, match=message):
        load_study(path, check_corpora=False)


# -------------------------------------------------------- 7: key-store update


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_7_an_overflowing_update_leaves_the_store_and_says_so(backend):
    N, d = 4, 6
    K = torch.nn.functional.normalize(torch.randn(N, d), dim=1)
    V, u = torch.zeros(N, d), torch.zeros(N)
    counts, cos = torch.ones(N, dtype=torch.long), torch.zeros(N, N, dtype=torch.long)
    cases = [(torch.full((N, d), 3e38), torch.full((N,), 1e-30), 0.01), (torch.ones(N, d), torch.ones(N), 1e300)]
    with ops.use_backend(backend):
        for sum_q, mass, alpha in cases:
            before = (K.clone(), V.clone(), u.clone())
            with pytest.warns(RuntimeWarning, match="left untouched"):
                assert ops.keystore_update(K, V, u, sum_q, mass, counts, cos, alpha, 0.0, 0.0, 0.05, 0.5) is False
            assert all(torch.equal(a, b) for a, b in zip((K, V, u), before))
        # ... and the next normal update is applied
        assert ops.keystore_update(K, V, u, torch.ones(N, d), torch.ones(N), counts, cos, 0.1, 0.0, 0.0, 0.05, 0.5)


# ------------------------------------------------------------ 8: checkpoints


@pytest.fixture(scope="module")
def finished(tiny_test_run):
    """The session's finished tiny-test run, ``(trainer, run dir)``: these tests only read it."""
    return tiny_test_run


def test_8_flipped_bits_are_refused(finished, tmp_path):
    _, run = finished
    data = bytearray((run / "checkpoint.pt").read_bytes())
    target = tmp_path / "run"
    target.mkdir()
    refused = 0
    for trial in range(6):  # flip 3-10 bits in the tensor data region (the file's middle)
        damaged = bytearray(data)
        rng = torch.Generator().manual_seed(trial)
        for _ in range(3 + trial):
            pos = len(data) // 4 + int(torch.randint(len(data) // 2, (1,), generator=rng))
            damaged[pos] ^= 1 << int(torch.randint(8, (1,), generator=rng))
        (target / "checkpoint.pt").write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match="damaged|corrupt"):
            load_checkpoint(target / "checkpoint.pt")
        refused += 1
    assert refused == 6


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("config"), "holds no run configuration"),
    (lambda s: s["position"].update(step=-5), "outside this run"),
    (lambda s: s["position"].update(step=10**9), "outside this run"),
    (lambda s: s["scheduler"].update(global_step=3), "does not match the position"),
    (lambda s: s.update(history=[]), "epoch records"),
    (lambda s: s.update(optimizer=[1, 2]), "no valid 'optimizer'"),
])
def test_8_checkpoint_schema_is_checked(finished, tmp_path, edit, message):
    _, run = finished
    state = load_checkpoint(run / "checkpoint.pt")
    edit(state)
    save_checkpoint(tmp_path / "r" / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match=message):
        Trainer(None, tmp_path / "r", resume=True, progress=False, echo=False)


# ------------------------------------------------------ 9: run directories


def test_9_a_second_run_into_the_same_directory_is_refused_with_the_pid(tmp_path):
    config = apply_overrides(get_preset("tiny-test"), ["epochs=1", f"cache_dir={tmp_path}"])
    first = Trainer(config, tmp_path / "run", progress=False, echo=False)  # holds the directory
    try:
        code = ("import sys; from some.runs import Trainer, get_preset, apply_overrides\n"
                f"c = apply_overrides(get_preset('tiny-test'), ['epochs=1', 'cache_dir={tmp_path}'])\n"
                f"Trainer(c, {str(tmp_path / 'run')!r}, progress=False, echo=False)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
        assert out.returncode != 0 and f"is in use by PID {os.getpid()}" in out.stderr, out.stderr[-500:]
        cli = subprocess.run([sys.executable, "-m", "some", "train", "--preset", "tiny-test", "--set",
                              f"cache_dir={tmp_path}", "--out", str(tmp_path / "run")], capture_output=True,
                             text=True, env=ENV, timeout=120)
        assert cli.returncode != 0 and f"in use by PID {os.getpid()}" in cli.stderr
        assert cli.stderr.strip().count("\n") == 0 and cli.stderr.startswith("some: error:")
    finally:
        first.close()
    Trainer(None if False else config, tmp_path / "run", progress=False, echo=False).close()  # free again


def test_9_a_run_killed_before_its_first_checkpoint_can_be_restarted(tmp_path):
    config = apply_overrides(get_preset("tiny-test"), ["epochs=1", f"cache_dir={tmp_path}"])
    run = tmp_path / "run"
    Trainer(config, run, progress=False, echo=False).close()  # wrote config.yaml, run.json: then "died"
    assert (run / "config.yaml").is_file() and not (run / "checkpoint.pt").exists()
    result = Trainer(config, run, progress=False, echo=False).run(make_plots=False)
    assert len(result.history) == 1
    with pytest.raises(RunDirError, match="not empty"):  # a finished run is not overwritten
        Trainer(config, run, progress=False, echo=False)


# ------------------------------------------------------------ 10: files, CLI


@pytest.mark.parametrize("case", ["long", "file", "under_file", "readonly", "proc"])
def test_10_bad_out_directories_are_one_line(case, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    out = {"long": tmp_path / ("x" * 300), "file": blocker, "under_file": blocker / "run", "readonly": ro / "run",
           "proc": Path("/proc/some-test/run")}[case]
    if case == "readonly" and os.geteuid() == 0:
        out = Path("/sys/some-test/run")  # root writes into read-only directories, not into sysfs
    line = _one_line_error(capsys, ["train", "--preset", "tiny-test", "--set", f"cache_dir={tmp_path}",
                                    "--out", str(out)])
    assert "file not found" not in line or case != "proc"


@pytest.mark.parametrize("content, message", [
    (None, "is not a regular file"),
    (b"\x00\xff\xfe\x89binary", "not UTF-8"),
    ("epochs: 1\n".encode("utf-16"), "not UTF-8"),
    (b"[" * 20000 + b"]" * 20000, "nested too deeply|not valid YAML"),
    (b"epochs: 1\nepochs: 2\n", "duplicate key 'epochs'"),
])
def test_10_bad_config_files_are_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    import re

    line = _one_line_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "r")], 2)
    assert re.search(message, line) and str(path) in line, line


def test_10_dev_zero_as_a_config_is_refused_at_once(capsys):
    line = _one_line_error(capsys, ["train", "--config", "/dev/zero", "--out", "/tmp/never"], 2)
    assert "not a regular file" in line


def test_10_corrupt_metrics_and_devices_are_one_line(finished, tmp_path, capsys):
    import shutil

    _, run = finished
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "metrics.jsonl").write_text('{"epoch": 1}\n{not json\n')
    line = _one_line_error(capsys, ["report", str(copy)])
    assert "metrics.jsonl:2: not valid JSON" in line
    line = _one_line_error(capsys, ["train", "--preset", "tiny-test", "--device", "tpu:7",
                                    "--out", str(tmp_path / "x")])
    assert "tpu:7" in line


def test_10_invalid_utf8_jsonl_names_the_file(tmp_path, capsys):
    bad = tmp_path / "docs.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    line = _one_line_error(capsys, ["train", "--preset", "tiny-test", "--set", f"data_source=files:{bad}",
                                    f"cache_dir={tmp_path}", "--out", str(tmp_path / "r")])
    assert str(bad) in line and "UTF-8" in line


def test_10_debug_shows_the_traceback(capsys):
    with pytest.raises(ConfigError):
        cli_main(["--debug", "train", "--preset", "nope", "--out", "/tmp/x"])


# ------------------------------------------------------- 11: double backward


def test_11_double_backward_is_a_clear_error():
    q, K, _ = make_route_inputs(5, 4, 3)
    q.requires_grad_()
    r = ops.route(q, K, 2, 0.8)
    with pytest.raises(RuntimeError, match=r"some.route: double backward .* is not supported"):
        torch.autograd.grad(r.gates.square().sum(), q, create_graph=True)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    idx, gates = random_routing(5, 3, 2, torch.float64)
    w = make_experts(3, 4, 6)
    with pytest.raises(RuntimeError, match=r"some.experts: double backward .* is not supported"):
        torch.autograd.grad(ops.experts(x, idx, gates, *w).square().sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(ops.experts(x, idx, gates, *w).square().sum(), x)  # first order: fine
    assert torch.isfinite(gx).all()


# ---------------------------------------------------------------- 12: minor


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_12_huge_queries_do_not_overflow_the_norm(backend):
    q, K, _ = make_route_inputs(20, 8, 6, torch.float32)
    with ops.use_backend(backend):
        want = ops.route(q, K, 3, 0.8)
        got = ops.route(q * 1e30, K, 3, 0.8)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.gates, want.gates)
    assert math.isfinite(float(ops.keystore_stats(q * 1e30, want.indices, want.gates, 6).sum_q.abs().max()))


def test_12_aliased_in_place_arguments_are_refused():
    K = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    u = torch.zeros(4)
    stats = (torch.ones(4, 6), torch.ones(4), torch.ones(4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long))
    for backend in ("native", "torch"):
        with ops.use_backend(backend), pytest.raises(ValueError, match="must not share memory"):
            ops.keystore_update(K, K, u, *stats, 0.1, 0.0, 0.0, 0.05, 0.5)


def test_atomic_files_get_the_usual_mode(tmp_path):
    """mkstemp makes owner-only files; run files and exported models must be readable as plain
    open() would make them (0666 & ~umask)."""
    import os

    from some.files import atomic_write

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
