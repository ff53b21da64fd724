"""Routing dynamics (issue 13): the telemetry's fields against hand-computed
cases, dead-expert revival, dynamics.jsonl / pictures / TensorBoard of a run,
exact resume of the log, and revival under data parallelism."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_distributed import run_train

from some.analysis import dynamics_records, layer_record, mean_pairwise_cosine
from some.analysis.dynamics_plots import dynamics_curves, usage_heatmap
from some.nn import SoMELayer, SoMELayerConfig
from some.runs import get_preset, train
from some.runs.config import apply_overrides
from some.runs.dynamics import read_dynamics


def layer_of(**overrides) -> SoMELayer:
    cfg = SoMELayerConfig(**{**dict(d_model=8, num_experts=6, d_ffn=16, top_k=2), **overrides})
    return SoMELayer(cfg, seed=3).train()


# ------------------------------------------------------------------ hand-computed cases
def test_planted_collapse_fields():
    """Every token on experts {1, 4}, same counts: 2 used, Gini and entropy known, top-set share 1."""
    layer = layer_of()
    tel = layer.telemetry
    tel.probe_next = True
    indices = torch.tensor([[1, 4], [4, 1], [1, 4], [4, 1]])
    scores = torch.tensor([[0.9, 0.5], [0.8, 0.6], [0.7, 0.1], [0.6, 0.2]])
    tel.observe_routing(indices, scores)
    counts = torch.tensor([0, 4, 0, 0, 4, 0])
    keys = layer.keys.clone()
    tel.observe_update(counts, keys, keys)
    r = layer_record(layer, dead_after=100)
    assert r["experts_used"] == 2 and r["experts_used_total"] == 2
    # Gini of (0,0,0,0,4,4) = Σ_i (2i - n - 1) c_(i) / (n Σ c) = ((2*5-7)*4 + (2*6-7)*4) / (6*8) = 32/48
    assert r["gini"] == pytest.approx(2 / 3)
    assert r["entropy"] == pytest.approx(1.0) and r["effective_experts"] == pytest.approx(2.0)
    assert r["top1_score"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)
    assert r["selected_score"] == pytest.approx(sum(map(sum, scores.tolist())) / 8)
    assert r["top_set_share"] == pytest.approx(1.0)  # {1,4} and {4,1} are the same set
    assert r["key_move_mean"] == 0 and r["key_move_max"] == 0 and r["dead"] == 0
    assert r["counts"] == counts.tolist()


def test_top_set_share_and_empty_slots():
    layer = layer_of()
    tel = layer.telemetry
    tel.probe_next = True
    # sets {0,1} x2, {2,3} x1, padding token (-1) ignored
    tel.observe_routing(torch.tensor([[0, 1], [1, 0], [2, 3], [-1, -1]]),
                        torch.tensor([[1., 1], [1, 1], [1, 1], [0, 0]]))
    assert not tel.probe_next  # consumed
    tel.observe_routing(torch.tensor([[5, 4]]), torch.tensor([[1., 1]]))  # not probed
    r = layer_record(layer, dead_after=10)
    assert r["top_set_share"] == pytest.approx(2 / 3)
    assert r["top1_score"] == pytest.approx(1.0) and r["selected_score"] == pytest.approx(1.0)
    tel.reset_window()
    assert layer_record(layer, dead_after=10)["top_set_share"] is None


def test_planted_dead_expert():
    """Expert 2 is never selected: it is dead once dead_after updates passed, not before."""
    layer = layer_of()
    tel = layer.telemetry
    keys = layer.keys.clone()
    W = 5
    for step in range(1, 9):
        counts = torch.tensor([3, 1, 0, 2, 5, 1]) if step != 3 else torch.tensor([3, 0, 0, 2, 5, 1])
        tel.observe_update(counts, keys, keys)
        dead = layer_record(layer, dead_after=W)["dead"]
        assert dead == (1 if step >= W else 0), step
    # expert 1 skipped once (step 3): it is not dead with W = 5, and dead with W = 1 at step 3 only
    assert tel.dead(W).tolist() == [False, False, True, False, False, False]
    assert layer_record(layer, dead_after=8)["dead"] == 1 and layer_record(layer, dead_after=9)["dead"] == 0
    # inactive experts are not dead, they are out
    layer.expert_active[2] = False
    assert layer_record(layer, dead_after=W)["dead"] == 0
    assert layer_record(layer, dead_after=W)["experts_used_total"] == 5


def test_key_movement_mean_and_max():
    layer = layer_of()
    tel = layer.telemetry
    before = torch.zeros(6, 8)
    after = torch.zeros(6, 8)
    after[0, 0] = 3.0  # moved 3
    after[1, :2] = torch.tensor([0.6, 0.8])  # moved 1
    tel.observe_update(torch.ones(6, dtype=torch.long), before, after)
    tel.observe_update(torch.ones(6, dtype=torch.long), before, before)  # no movement
    r = layer_record(layer, dead_after=10)
    assert r["updates"] == 2
    assert r["key_move_mean"] == pytest.approx((4.0 / 6 + 0.0) / 2)
    assert r["key_move_max"] == pytest.approx(3.0)


def test_mean_pairwise_cosine():
    e = torch.eye(4)
    assert mean_pairwise_cosine(e) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.ones(5, 3) * torch.tensor([1., 2, 3])) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1., 0], [-2., 0]])) == pytest.approx(-1.0)
    x = torch.randn(7, 5, dtype=torch.float64)
    xn = torch.nn.functional.normalize(x, dim=1)
    full = xn @ xn.T
    want = (full.sum() - full.diag().sum()) / (7 * 6)
    assert mean_pairwise_cosine(x) == pytest.approx(float(want))
    assert mean_pairwise_cosine(x[:1]) == 0.0


def test_real_layer_window_counts_match_routing():
    """The window counts are the key-store update's counts: the bincount of the routed indices."""
    torch.manual_seed(0)
    layer = layer_of(num_experts=8, top_k=3)
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    want = torch.zeros(8, dtype=torch.long)
    for _ in range(3):
        layer.usage.start()
        layer(x, mask)
        want += torch.bincount(layer.usage.last_indices[layer.usage.last_indices >= 0], minlength=8)
        layer.update_keys()
    r = layer_record(layer, dead_after=100)
    assert r["counts"] == want.tolist() and r["updates"] == 3
    assert sum(r["counts"]) == 3 * 8 * 3  # 8 real tokens x k = 3, three steps
    assert 0 < r["key_move_mean"] <= r["key_move_max"]


def test_telemetry_state_is_saved_and_old_state_dicts_load():
    layer = layer_of()
    layer(torch.randn(3, 8))
    layer.update_keys()
    state = layer.state_dict()
    assert "telemetry.counts" in state and "telemetry.last_used" in state
    other = layer_of()
    other.load_state_dict(state)
    assert torch.equal(other.telemetry.counts, layer.telemetry.counts) and other.telemetry.steps_taken == 1
    old = {k: v for k, v in state.items() if not k.startswith("telemetry.")}  # before the telemetry
    fresh = layer_of()
    fresh.load_state_dict(old)  # strict: the absent telemetry starts afresh
    assert int(fresh.telemetry.step) == 0


# ------------------------------------------------------------------ revival
def test_revival_moves_exactly_the_dead_keys_to_routed_queries():
    """With the self-organization rules off the keys only move by revival: only dead keys
    move (all of them, up to the step's 12 tokens), each to the normalized query of a
    distinct token of the step."""
    torch.manual_seed(1)
    W = 2
    layer = layer_of(num_experts=16, top_k=1, alpha=0.0, beta=0.0, delta=0.0, revive_after=W)
    queries = []
    layer.router.net.register_forward_hook(lambda m, i, o: queries.append(o.detach().reshape(-1, 8)))
    centre = torch.randn(8)
    revived_total = 0
    for step in range(8):
        x = torch.randn(1, 12, 8) * 0.1 + centre  # new tokens in one cone: a few experts take them all
        queries.clear()
        before = layer.keys.clone()
        last = layer.telemetry.last_used.clone()
        layer(x)
        counts = layer.pending_stats().counts.clone()
        layer.update_keys()
        # dead after this update: not selected now and not in the W - 1 before
        used_now = counts > 0
        would_be_dead = ~used_now & ((step - last) >= W)
        moved = (layer.keys - before).norm(dim=1) > 1e-4  # (re-normalization alone moves ~1e-7)
        # every dead key moves, as far as the step has distinct tokens (12) to move them to
        assert not (moved & ~would_be_dead).any(), step
        assert int(moved.sum()) == min(int(would_be_dead.sum()), 12), step
        if moved.any():
            q = torch.nn.functional.normalize(queries[0], dim=1)
            new = layer.keys[moved]
            match = torch.cdist(new, q).argmin(dim=1)
            assert torch.allclose(new, q[match], atol=1e-6)  # each is a token's normalized query
            assert len(set(match.tolist())) == len(match)  # distinct tokens
            assert torch.all(layer.key_velocity[moved] == 0) and torch.all(layer.key_usage[moved] == 0)
            assert torch.all(layer.telemetry.last_used[moved] == step)  # a new lease of W steps
        revived_total += int(moved.sum())
    assert revived_total > 0
    assert int(layer.telemetry.revived) == revived_total


def test_revival_is_reproducible_and_respects_padding():
    def run():
        torch.manual_seed(2)
        layer = layer_of(num_experts=12, top_k=1, revive_after=1)
        x = torch.randn(2, 4, 8) * 0.05 + torch.randn(8)
        mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
        q = []
        layer.router.net.register_forward_hook(lambda m, i, o: q.append(o.detach().reshape(-1, 8)))
        for _ in range(3):
            layer(x, mask)
            layer.update_keys()
        real_q = torch.nn.functional.normalize(q[0][mask.reshape(-1)], dim=1)
        return layer, real_q

    a, qa = run()
    b, _ = run()
    assert torch.equal(a.keys, b.keys)  # seeded by (seed, layer, step): the same draws
    # only 2 real tokens per step: at most 2 revivals per step, all at real tokens' queries
    assert 0 < int(a.telemetry.revived) <= 2 * 3
    init = layer_of(num_experts=12, top_k=1).keys
    changed = (a.keys - init).norm(dim=1) > 1e-6
    moved_keys = a.keys[changed]
    dist = torch.cdist(moved_keys, torch.nn.functional.normalize(qa, dim=1)).min(dim=1).values
    # revived keys sit on real queries (a key revived and then left alone stays exactly there)
    assert (dist < 1e-3).any()


def test_revival_off_draws_nothing():
    layer = layer_of()
    layer(torch.randn(4, 8))
    assert layer.pending_candidates() is None
    layer.update_keys()
    assert int(layer.telemetry.revived) == 0


# ------------------------------------------------------------------ plots
def test_dynamics_pictures(tmp_path):
    steps = [10, 20, 30]
    counts = [[5, 0, 3, 0], [8, 0, 1, 0], [9, 1, 0, 0]]
    out = usage_heatmap(steps, counts, tmp_path / "h.png")
    assert out.stat().st_size > 5000
    with pytest.raises(ValueError, match="one window per step"):
        usage_heatmap(steps[:2], counts, tmp_path / "bad.png")
    records = [{"step": s, "layer": i, "experts_used": 2, "effective_experts": 1.5, "dead": i, "key_move_mean": 1e-3,
                "top_set_share": 0.5 if s > 10 else None, "counts": c} for s, c in zip(steps, counts) for i in (0, 1)]
    assert dynamics_curves(records, tmp_path / "c.png").stat().st_size > 5000


# ------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dyn") / "run"
    cfg = apply_overrides(get_preset("tiny-test"), ["log_every=3", "tensorboard=true"])
    result = train(cfg, out, progress=False, echo=False)
    return out, cfg, result


def test_run_writes_dynamics_and_report(tiny_run):
    out, cfg, result = tiny_run
    records = read_dynamics(out)
    total = 2 * (64 // 8)  # epochs x steps
    steps = sorted({r["step"] for r in records})
    assert steps == [3, 6, 9, 12, 15, 16]  # every log_every steps and the last
    assert len(records) == len(steps) * cfg.n_layers
    for r in records:
        assert 0 <= r["dead"] <= r["active"] <= cfg.num_experts
        assert r["experts_used"] <= r["experts_used_total"] <= cfg.num_experts
        assert math.isclose(r["effective_experts"], 2 ** r["entropy"])
        assert r["top_set_share"] is not None and 0 < r["top_set_share"] <= 1  # every record's step is probed
        # the window's selections: k per real token of its steps' batches (some positions are padding)
        window = r["step"] - max([s for s in steps if s < r["step"]], default=0)
        selections = sum(r["counts"])
        assert selections % cfg.top_k == 0
        assert 0.5 * window * cfg.batch_size * cfg.seq_len * cfg.top_k < selections
        assert selections <= window * cfg.batch_size * cfg.seq_len * cfg.top_k
    assert records[-1]["step"] == total
    for name in ("usage_heatmap.png", "dynamics.png"):
        assert (out / name).stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "## Routing dynamics during training" in report and "usage_heatmap.png" in report
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["experts_used_training"] >= analysis["experts_used"]
    assert "at least once during training" in report


def test_tensorboard_events(tiny_run):
    out, cfg, _ = tiny_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "layer0/experts_used" in tags["scalars"] and "layer1/key_move_mean" in tags["scalars"]
    assert "layer1/usage" in tags["histograms"]
    want = [r["experts_used"] for r in read_dynamics(out) if r["layer"] == 0]
    assert [e.value for e in acc.Scalars("layer0/experts_used")] == want


def test_resume_rewrites_the_log_exactly(tmp_path):
    """A run stopped after step 10 (checkpoint at 8, records at 9 beyond it) and resumed writes
    the same dynamics.jsonl as the uninterrupted run."""
    full = tmp_path / "full"
    out = tmp_path / "resumed"
    base = ["--preset", "tiny-test", "--set", "log_every=3", "checkpoint_every=4", "--no-plots", "--no-progress"]
    run_train(full, base=base)
    first = run_train(out, base=base, check=False, faults={"stop_after_step": "10"})
    assert first.returncode != 0
    assert max(r["step"] for r in read_dynamics(out)) == 9
    with open(out / "dynamics.jsonl", "a") as f:
        f.write('{"step": 12, "la')  # a half-written line of a crash
    run_train(out, "--resume", "--no-plots", "--no-progress", base=())
    assert read_dynamics(out) == read_dynamics(full)


@pytest.mark.slow
def test_revival_keeps_two_gloo_ranks_identical(tmp_path):
    out = tmp_path / "two"
    # (a collective timeout under the subprocess's: a rank left waiting raises one line naming
    # the collective instead of hanging)
    base = ["--preset", "tiny-test", "--set", "revive_after=2", "log_every=2", "dist_timeout=120", "--no-plots",
            "--no-progress"]
    run_train(out, base=base, nproc=2, faults={"state_digest": "1"})
    rank0 = (out / "digest.rank0.jsonl").read_text().splitlines()
    rank1 = (out / "digest.rank1.jsonl").read_text().splitlines()
    assert len(rank0) == 16 and rank0 == rank1  # keys, velocity, usage, parameters, step by step
    assert sum(r["revived"] for r in read_dynamics(out)) > 0  # revival happened (and identically)


def test_dynamics_records_of_a_model():
    model_cfg = get_preset("tiny-test")
    from some.runs.build import build_model

    model, _ = build_model(model_cfg, torch.device("cpu"))
    model.train()
    ids = torch.randint(0, 300, (2, 16))
    model(ids, torch.ones_like(ids, dtype=torch.bool))
    model.update_keys()
    records = dynamics_records(model, step=1, dead_after=5)
    assert [r["layer"] for r in records] == [0, 1] and all(r["step"] == 1 for r in records)
    assert all(sum(r["counts"]) == 2 * 16 * model_cfg.top_k for r in records)


def test_shared_direction_share():
    # ||mean||² / mean ||·||²: 1 for identical rows, ~1/d for random directions, masked rows
    # left out, and zero-started when a checkpoint predates the buffers
    from some.nn.telemetry import RoutingTelemetry

    d = 64
    tel = RoutingTelemetry(8, d, dtype=torch.float64)
    same = torch.randn(1, d, dtype=torch.float64).expand(50, d)
    noise = torch.randn(400, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tel.observe_shared(same, None, noise, None)
    shared_input, shared_query = tel.shared_share()
    assert abs(shared_input - 1.0) < 1e-12
    assert 0.5 / 400 < shared_query < 3.0 / 400  # ~1/n for n rows in random directions
    tel.reset_window()
    assert tel.shared_share() == (None, None)
    real = torch.zeros(400, dtype=torch.bool)
    real[:10] = True
    tel.observe_shared(torch.cat([same[:10], noise[10:]]), real, same[:3], None)
    assert abs(tel.shared_share()[0] - 1.0) < 1e-12  # only the 10 real (identical) rows count
    state = {k: v for k, v in tel.state_dict().items() if not k.startswith("shared")}
    fresh = RoutingTelemetry(8, d, dtype=torch.float64)
    fresh.load_state_dict(state)  # strict: the later buffers may be absent
    assert fresh.shared_share() == (None, None)


def test_dynamics_records_hold_the_shared_share():
    torch.manual_seed(0)
    layer = SoMELayer(SoMELayerConfig(d_model=16, num_experts=8, top_k=2, d_ffn=8)).train()
    x = torch.randn(1, 16).expand(4, 16).reshape(1, 4, 16).clone()  # one direction for every token
    layer(x)
    record = layer_record(layer, dead_after=10)
    assert abs(record["shared_input"] - 1.0) < 1e-5 and record["shared_query"] > 0.99
