"""The key-store update at matrix-product speed (csrc/cpu/repulsion.h and the torch
backend's ``_push_sums``) against the literal SPEC §4 reference, in float64.

The fast update takes distances from products in tiles, θ from an exact selection (one
pass between bounds from a sample of pairs from 2^18 pairs on; two passes over a
histogram of the distances below that, and whenever the sampled bounds miss), and the
repulsion sum from the pairs under θ only; nearly coincident pairs are resolved from
their differences. Every path is forced here: one tile, many tiles recomputed between
the passes (SOME_KEYSTORE_BLOCK_BYTES), the sampled pass at every size and its fallback
(SOME_KEYSTORE_SAMPLED_MIN_PAIRS, SOME_KEYSTORE_SAMPLE_SIGMAS), ties, θ at 0 and 1, a
single pair, experts no token selected, experts masked out by the adaptive process,
near-duplicate keys.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from inputs import random_routing

from some import ops
from some.nn.config import SoMELayerConfig
from some.nn.keystore import KeyStore
from some.nn.router import Queries
from some.nn.telemetry import RoutingTelemetry
from some.ops.reference import keystore_update_ref

STRONG = dict(alpha=0.2, beta=0.1, delta=0.05, ema_decay=0.5)


def _stats(N, d, T=64, k=3, seed=0, only=None):
    """Statistics of a random routing; with ``only``, tokens pick among the first ``only`` experts."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, d, generator=g, dtype=torch.float64)
    idx, gates = random_routing(T, only or N, min(k, only or N), torch.float64, seed=seed)
    return ops.keystore_stats(q, idx, gates, N)


def _check(K, stats, theta_percentile, *, normalize=True, rules=STRONG, atol=1e-9):
    V = 0.01 * torch.randn(K.shape, generator=torch.Generator().manual_seed(1), dtype=K.dtype)
    u = torch.rand(K.shape[0], generator=torch.Generator().manual_seed(2), dtype=K.dtype)
    want = keystore_update_ref(K, V, u, *stats, theta_percentile=theta_percentile, normalize=normalize, **rules)
    K, V, u = K.clone(), V.clone(), u.clone()
    assert ops.keystore_update(K, V, u, *stats, theta_percentile=theta_percentile, normalize=normalize, **rules)
    for got, ref, name in zip((K, V, u), want, ("keys", "velocity", "usage")):
        torch.testing.assert_close(got, ref, atol=atol, rtol=0, msg=name)
    return K


def _unit(N, d, seed=0):
    return F.normalize(torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


@pytest.mark.parametrize("N", [2, 3, 33, 257, 1024])
@pytest.mark.parametrize("theta_percentile", [0.0, 0.05, 0.5, 1.0])
def test_update_equals_reference(N, theta_percentile, backend):
    _check(_unit(N, 16, seed=N), _stats(N, 16, seed=N), theta_percentile)


@pytest.mark.parametrize("block_bytes", [8 * 257 * 3, 8 * 257 * 64])
def test_blocks_recomputed_between_passes(block_bytes, monkeypatch, backend):
    # 3 rows per block (the distances recomputed for each pass) and 64 rows per block
    # (kept: N² distances fit in 8 budgets)
    monkeypatch.setenv("SOME_KEYSTORE_BLOCK_BYTES", str(block_bytes))
    _check(_unit(257, 16, seed=5), _stats(257, 16, seed=5), 0.05)
    _check(_unit(257, 16, seed=6), _stats(257, 16, seed=6), 0.5, normalize=False)


SELECTIONS = {"sampled": {"SOME_KEYSTORE_SAMPLED_MIN_PAIRS": "1"},
              # bounds narrowed past the two ranks: the pass finds they missed and starts again
              "fallback": {"SOME_KEYSTORE_SAMPLED_MIN_PAIRS": "1", "SOME_KEYSTORE_SAMPLE_SIGMAS": "-6"}}


@pytest.fixture(params=SELECTIONS)
def selection(request, monkeypatch):
    """The native CPU op's selection forced by its knobs: its name."""
    for name, value in SELECTIONS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


@pytest.mark.parametrize("N, theta_percentile", [(3, 0.5), (33, 0.05), (257, 0.0), (257, 0.5), (300, 1.0),
                                                 (1024, 0.05)])
def test_sampled_selection_equals_reference(selection, N, theta_percentile):
    # the native CPU op's one-pass selection (the default from 2^18 pairs, N = 1024 here)
    # forced at every size, and its fallback when the sampled bounds miss; the extension's
    # counters say which path ran
    from some import _C
    before = _C.keystore_selection_counts()
    _check(_unit(N, 16, seed=N), _stats(N, 16, seed=N), theta_percentile)
    K = _unit(N, 16, seed=N)
    K[1] = K[0]  # a coincident pair and ties at distance 0
    _check(K, _stats(N, 16, seed=N), theta_percentile, normalize=False)
    after = _C.keystore_selection_counts()
    assert after["sampled"] - before["sampled"] == 2
    assert after["fallback"] - before["fallback"] == (2 if selection == "fallback" else 0)


@pytest.mark.parametrize("theta_percentile", [0.0, 0.25, 0.9])
def test_sampled_selection_with_ties(selection, theta_percentile):
    eye = torch.eye(8, dtype=torch.float64)
    _check(torch.cat([eye, -eye]), _stats(16, 8, seed=3), theta_percentile)


def test_sampled_selection_in_float32(monkeypatch):
    # N = 1024 float32 keys: the one-pass selection (the default at this size) picks the same θ
    # and the same close pairs as its two-pass fallback over the same tiles (the same float32
    # distances); the sums differ only in their order. (Against the float64 reference a pair
    # within float32 error of θ may fall on the other side of it.)
    K = _unit(1024, 32, seed=14).float()
    stats = [s.float() if s.is_floating_point() else s for s in _stats(1024, 32, seed=14)]
    out = []
    for sigmas in ("6", "-6"):
        monkeypatch.setenv("SOME_KEYSTORE_SAMPLE_SIGMAS", sigmas)
        keys, V, u = K.clone(), torch.zeros_like(K), torch.zeros(1024)
        assert ops.keystore_update(keys, V, u, *stats, theta_percentile=0.05, **STRONG)
        out.append(V)
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("theta_percentile", [0.0, 0.2, 0.25, 0.9, 1.0])
def test_ties(theta_percentile, monkeypatch, backend):
    # ±e_i: every distance is exactly √2 (orthogonal) or 2 (opposite), so θ lands on
    # tied values and `D < θ` must exclude the ties exactly as the reference does
    d = 8
    eye = torch.eye(d, dtype=torch.float64)
    K = torch.cat([eye, -eye])
    stats = _stats(2 * d, d, seed=3)
    _check(K, stats, theta_percentile)
    monkeypatch.setenv("SOME_KEYSTORE_BLOCK_BYTES", str(8 * 2 * d))  # one row per block
    _check(K, stats, theta_percentile)


@pytest.mark.parametrize("theta_percentile", [0.0, 0.5, 1.0])
def test_single_pair(theta_percentile, backend):
    # one distance: θ is it whatever the percentile, and no pair lies strictly below
    K = _unit(2, 4, seed=9)
    stats = _stats(2, 4, k=2, seed=9)
    _check(K, stats, theta_percentile, rules=dict(alpha=0.0, beta=0.0, delta=0.3, ema_decay=0.0))
    _check(K, stats, theta_percentile)


def test_experts_never_selected(backend):
    # tokens route to the first 40 of 300 experts only: zero mass and co-selection elsewhere
    _check(_unit(300, 16, seed=4), _stats(300, 16, seed=4, only=40), 0.05)


@pytest.mark.parametrize("normalize", [True, False])
def test_near_duplicate_and_identical_keys(normalize, backend):
    # pairs the product form cannot resolve: identical keys (D = 0) and keys 1e-7 apart
    K = _unit(40, 16, seed=8)
    K[1] = K[0]
    K[3] = K[2] + 1e-7 * _unit(1, 16, seed=11)[0]
    K[5] = K[4] * (1 + 1e-9)
    _check(K, _stats(40, 16, seed=8), 0.05, normalize=normalize)


def test_near_duplicates_in_float32_keep_unit_directions(backend):
    # float32 keys 1e-4 apart: the product form alone would leave D² at rounding noise
    # and divide a noisy difference by it; the update stays within float32 error of the
    # float64 reference
    K = _unit(64, 32, seed=12)
    K[1] = F.normalize(K[0] + 1e-4 * _unit(1, 32, seed=13)[0], dim=0)
    stats = _stats(64, 32, seed=12)
    rules = dict(alpha=0.0, beta=0.0, delta=0.3, ema_decay=0.0)
    want = keystore_update_ref(K, torch.zeros_like(K), torch.zeros(64, dtype=torch.float64), *stats,
                               theta_percentile=0.05, **rules)
    K32 = K.float()
    stats32 = [s.float() if s.is_floating_point() else s for s in stats]
    assert ops.keystore_update(K32, torch.zeros_like(K32), torch.zeros(64), *stats32, theta_percentile=0.05, **rules)
    torch.testing.assert_close(K32.double(), want[0], atol=2e-5, rtol=0)


def test_masked_experts_in_a_layer(backend):
    # a layer whose adaptive process masked experts out: routing avoids them, the rules
    # still move every key (§4 has no mask), and the update equals the reference
    cfg = SoMELayerConfig(d_model=16, num_experts=48, top_k=4, d_ffn=8, alpha=0.2, beta=0.1, delta=0.05,
                          ema_decay=0.5, theta_percentile=0.1)
    store = KeyStore(cfg, seed=0, layer=0, dtype=torch.float64)
    store.reset_parameters()
    store.expert_active[::3] = False
    q = torch.randn(100, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    routed = store.route(q, training=True)
    assert not bool(store.expert_active[routed.indices.clamp_min(0)].logical_not().any())
    stats = ops.keystore_stats(q, routed.indices, routed.gates, 48)
    before = [t.clone() for t in (store.keys, store.key_velocity, store.key_usage)]
    want = keystore_update_ref(*before, *stats, cfg.alpha, cfg.beta, cfg.delta, cfg.theta_percentile, cfg.ema_decay)
    store.observe(Queries(q, None, 1, 100, False), routed, routed.indices, routed.gates, torch.Generator)
    store.update(RoutingTelemetry(48), lambda: torch.Generator(), wait=True)
    for got, ref in zip((store.keys, store.key_velocity, store.key_usage), want):
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_sparse_coselect_is_the_dense_one(backend):
    # the compact co-selection counts hold the same C, add up across micro-batches,
    # and give the same update as the dense matrix
    N, d = 50, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(80, d, generator=g, dtype=torch.float64)
    idx, gates = random_routing(80, N, 4, torch.float64, seed=7)
    dense = ops.keystore_stats(q, idx, gates, N)
    parts = [ops.keystore_stats(q[s], idx[s], gates[s], N, sparse_coselect=True) for s in (slice(0, 30), slice(30, 80))]
    sparse = parts[0] + parts[1]
    assert sparse.coselect.is_sparse and not dense.coselect.is_sparse
    assert sparse.coselect.coalesce()._nnz() <= 80 * 4 * 3  # T·k·(k−1) at most
    torch.testing.assert_close(sparse.coselect.to_dense(), dense.coselect, rtol=0, atol=0)
    K = _unit(N, d, seed=7)
    out = []
    for stats in (dense, sparse):
        keys, V, u = K.clone(), torch.zeros_like(K), torch.zeros(N, dtype=torch.float64)
        assert ops.keystore_update(keys, V, u, *stats, **STRONG, theta_percentile=0.1)
        out.append(keys)
    torch.testing.assert_close(out[0], out[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("sparse", [False, True])
def test_coselect_counts_skip_out_of_range_indices_as_the_cuda_kernels_do(sparse):
    # on CUDA the ops skip an index outside 0..N-1 unchecked (a check would synchronize):
    # the co-selection counts must not scatter out of bounds there, and count it as empty
    from some.ops.coselect import coselect_counts
    idx = torch.tensor([[0, 1, 6], [2, -1, 7], [1, 0, 3]])
    C = coselect_counts(idx, 4, sparse=sparse)
    C = C.to_dense() if sparse else C
    want = coselect_counts(idx.masked_fill(idx >= 4, -1), 4)
    assert torch.equal(C, want) and int(C.sum()) == 2 + 0 + 6  # ordered pairs of the valid slots per row


def test_coselect_errors_name_the_problem():
    K = _unit(6, 4)
    stats = _stats(6, 4)
    with pytest.raises(ValueError, match="'coselect' must have shape"):
        ops.keystore_update(K.clone(), torch.zeros_like(K), torch.zeros(6, dtype=torch.float64), *stats[:3],
                            stats.coselect[:5], **STRONG, theta_percentile=0.1)
    with pytest.raises(TypeError, match="coselect"):
        ops.keystore_update(K.clone(), torch.zeros_like(K), torch.zeros(6, dtype=torch.float64), *stats[:3],
                            stats.coselect.double(), **STRONG, theta_percentile=0.1)
