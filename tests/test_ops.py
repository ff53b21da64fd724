"""The SoME ops against the plain-PyTorch reference (some/ops/reference.py), on both
backends (the `backend` fixture): values, gradients, gradcheck, opcheck (native),
awkward sizes, determinism, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from inputs import make_experts, make_route_inputs, random_routing, update_op_inputs
from torch.utils.flop_counter import FlopCounterMode

from some import ops
from some.ops.reference import experts_loop_ref, experts_ref, keystore_stats_ref, keystore_update_ref, route_ref

GATINGS = ops.GATINGS
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-5)}


# ----------------------------------------------------------------- route


@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("score_mode", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_route_matches_reference(gating, score_mode, dtype, device, backend):
    T, d, N, k = 23, 11, 9, 3
    q, K, thr = make_route_inputs(T, d, N, dtype, device)
    temp = 0.8 if score_mode == "cosine" else 3.0
    kw = dict(score_mode=score_mode, thresholds=thr if gating == "top_any" else None)
    q1 = q.clone().requires_grad_()
    got = ops.route(q1, K, k, temp, gating, **kw)
    q2 = q.clone().requires_grad_()
    ref = route_ref(q2, K, k, temp, gating, **kw)
    assert torch.equal(got.indices.cpu(), ref[0]), "selected experts differ"
    torch.testing.assert_close(got.gates.cpu(), ref[1].cpu(), **TOL[dtype])
    torch.testing.assert_close(got.scores.cpu(), ref[2].cpu(), **TOL[dtype])
    # gradients through gates and scores together
    wg, ws = torch.randn_like(got.gates), torch.randn_like(got.scores)
    (got.gates * wg).sum().add((got.scores * ws).sum()).backward()
    (ref[1] * wg).sum().add((ref[2] * ws).sum()).backward()
    torch.testing.assert_close(q1.grad, q2.grad, **TOL[dtype])


def test_route_top_any_threshold_gradient(backend):
    q, K, thr = make_route_inputs(31, 8, 6)
    thr1, thr2 = thr.clone().requires_grad_(), thr.clone().requires_grad_()
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    got = ops.route(q1, K, 4, 0.5, "top_any", thresholds=thr1)
    ref = route_ref(q2, K, 4, 0.5, "top_any", thresholds=thr2)
    w = torch.randn_like(got.gates)
    (got.gates * w).sum().backward()
    (ref[1] * w).sum().backward()
    assert thr2.grad.abs().sum() > 0, "test case must exercise the threshold gradient"
    torch.testing.assert_close(thr1.grad, thr2.grad)
    torch.testing.assert_close(q1.grad, q2.grad)


def test_route_top_any_gradient_when_one_expert_fires(backend):
    """A token with one fired expert has gate exactly 1 and no gate gradient (found by the
    fuzzer: the torch backend's straight-through mask rounded to 1 - 2^-53)."""
    q, K, thr = make_route_inputs(64, 3, 5, seed=0)
    thr = thr / 0.3  # N(0, 1) thresholds: many tokens fire a single expert
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    got = ops.route(q1, K, 2, 0.8, "top_any", thresholds=thr)
    ref = route_ref(q2, K, 2, 0.8, "top_any", thresholds=thr)
    single = (got.indices >= 0).sum(1) == 1
    assert single.sum() >= 5, "the case must have tokens that fire one expert"
    assert (got.gates[single, 0] == 1).all()
    got.gates.sum().backward()
    ref[1].sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad, atol=1e-12, rtol=1e-9)


def test_route_top_any_fallback_and_empty_slots(backend):
    q, K, _ = make_route_inputs(10, 6, 5)
    high = torch.full((5,), 100.0, dtype=torch.float64)  # nothing can fire
    r = ops.route(q, K, 3, 0.8, "top_any", thresholds=high)
    assert (r.indices == -1).all() and (r.gates == 0).all()
    r = ops.route(q, K, 3, 0.8, "top_any", thresholds=high, fallback_top1=True)
    best = (F.normalize(q, dim=-1) @ F.normalize(K, dim=-1).T).argmax(1)
    assert torch.equal(r.indices[:, 0], best)
    assert (r.gates[:, 0] == 1).all() and (r.indices[:, 1:] == -1).all()


def test_route_top_p_takes_until_mass_reached(backend):
    q, K, _ = make_route_inputs(40, 8, 12)
    r = ops.route(q, K, 12, 0.1, "top_p", top_p=0.4)
    P = torch.softmax(F.normalize(q, dim=-1) @ F.normalize(K, dim=-1).T / 0.1, dim=1)
    for t in range(40):
        n = int((r.indices[t] >= 0).sum())
        cum = torch.cumsum(r.gates[t, :n], 0)
        assert cum[-1] >= 0.4 - 1e-12 and (n == 1 or cum[-2] < 0.4)
        torch.testing.assert_close(r.gates[t, :n], P[t, r.indices[t, :n]])


def test_route_active_mask_excludes_experts(backend):
    q, K, _ = make_route_inputs(50, 8, 7)
    active = torch.tensor([True, False, True, True, False, True, True])
    for gating in ("softmax", "top_p"):
        r = ops.route(q, K, 5, 0.8, gating, active=active)
        chosen = r.indices[r.indices >= 0]
        assert not active[chosen].logical_not().any()
        ref = route_ref(q, K, 5, 0.8, gating, active=active)
        assert torch.equal(r.indices, ref[0])
        torch.testing.assert_close(r.gates, ref[1])
    # fewer active experts than k: the remaining slots are empty
    r = ops.route(q, K, 6, 0.8, active=active)
    assert (r.indices[:, 5] == -1).all() and (r.gates[:, 5] == 0).all()


@pytest.mark.parametrize("gating", GATINGS)
def test_route_with_every_expert_inactive_has_finite_gradients(gating, backend):
    """Found by the fuzzer: top_p's backward took a softmax over no eligible expert (NaN)."""
    q, K, thr = make_route_inputs(3, 4, 2)
    q.requires_grad_()
    r = ops.route(q, K, 1, 0.8, gating, thresholds=thr if gating == "top_any" else None,
                  active=torch.zeros(2, dtype=torch.bool), fallback_top1=True)
    assert (r.indices == -1).all() and (r.gates == 0).all()
    (r.gates.sum() + r.scores.sum()).backward()
    assert torch.isfinite(q.grad).all() and (q.grad == 0).all()


def test_route_ties_prefer_lower_index(backend):
    K = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    r = ops.route(q, K, 3, 0.8)
    assert r.indices.tolist() == [[0, 2, 3]]
    r = ops.route(q, K, 4, 0.8)  # k = N, large-k path uses another selection routine
    assert r.indices.tolist() == [[0, 2, 3, 1]]
    K40 = torch.zeros(40, 2, dtype=torch.float64)
    K40[:, 0] = 1.0
    r = ops.route(q, K40, 40, 0.8)
    assert r.indices.tolist() == [list(range(40))]


@pytest.mark.parametrize("gating", GATINGS)
def test_route_gradcheck(gating, backend):
    q, K, thr = make_route_inputs(7, 5, 6, seed=3)
    q.requires_grad_()

    def f(q):
        r = ops.route(q, K, 3, 0.7, gating, thresholds=thr if gating == "top_any" else None)
        # top_any gates are a straight-through estimator (piecewise constant
        # forward, surrogate backward): only its scores have a true gradient;
        # its gates are checked against the reference STE instead.
        return (r.scores,) if gating == "top_any" else (r.gates, r.scores)

    assert torch.autograd.gradcheck(f, (q,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("gating", ["softmax", "top_p", "top_any"])
def test_route_opcheck(gating, device):
    q, K, thr = make_route_inputs(9, 6, 5, torch.float32, device)
    q.requires_grad_()
    th = thr.clone().requires_grad_() if gating == "top_any" else None
    torch.library.opcheck(torch.ops.some.route.default, (q, K, 3, 0.8, gating, "cosine", 0.4, th, None, False))


def test_route_bfloat16_close_to_float32(backend):
    q, K, _ = make_route_inputs(64, 32, 16, torch.float32)
    r32 = ops.route(q, K, 4, 0.8)
    r16 = ops.route(q.bfloat16(), K, 4, 0.8)
    assert r16.gates.dtype == torch.bfloat16 and r16.indices.dtype == torch.long
    agree = (r16.indices == r32.indices).float().mean()
    assert agree > 0.9  # bf16 rounding of the query may swap near-tied experts
    same = (r16.indices == r32.indices).all(1)
    torch.testing.assert_close(r16.gates[same].float(), r32.gates[same], atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------- experts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,d,N,h,k", [(37, 13, 6, 17, 3), (1, 8, 4, 8, 4), (5, 7, 1, 9, 1), (64, 16, 8, 32, 8)])
def test_experts_matches_reference(T, d, N, h, k, dtype, device, backend):
    x = torch.randn(T, d, dtype=dtype, device=device)
    idx, gates = random_routing(T, N, k, dtype, device)
    w = make_experts(N, d, h, dtype, device)
    x1, g1 = x.clone().requires_grad_(), gates.clone().requires_grad_()
    x2, g2 = x.clone().requires_grad_(), gates.clone().requires_grad_()
    y1 = ops.experts(x1, idx, g1, *w)
    y2 = experts_ref(x2, idx, g2, *w)
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    gy = torch.randn_like(y1)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[dtype])
    torch.testing.assert_close(g1.grad * (idx >= 0), g2.grad * (idx >= 0), **TOL[dtype])
    # the naive loop over experts agrees as well (the benchmark baseline)
    torch.testing.assert_close(experts_loop_ref(x, idx, gates, *w), y2.detach(), **TOL[dtype])


def test_experts_gradcheck(backend):
    T, d, N, h, k = 6, 5, 3, 7, 2
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    idx, gates = random_routing(T, N, k, torch.float64, "cpu", seed=4)
    gates.requires_grad_()
    w = make_experts(N, d, h)
    assert torch.autograd.gradcheck(lambda x, g: ops.experts(x, idx, g, *w), (x, gates))


def test_experts_opcheck(device):
    T, d, N, h, k = 10, 6, 4, 5, 2
    x = torch.randn(T, d, device=device, requires_grad=True)
    idx, gates = random_routing(T, N, k, torch.float32, device)
    gates.requires_grad_()
    w = make_experts(N, d, h, torch.float32, device)
    torch.library.opcheck(torch.ops.some.experts.default, (x, idx, gates, *w))


def test_experts_bfloat16_error_no_worse_than_pytorch(backend):
    """bf16 with fp32 accumulation: the op's error against an fp64 reference is
    within a small factor of plain PyTorch's own bf16 error."""
    T, d, N, h, k = 96, 64, 8, 128, 2
    x = torch.randn(T, d, dtype=torch.float64)
    idx, gates = random_routing(T, N, k, torch.float64, "cpu", empty_frac=0)
    w = make_experts(N, d, h)
    exact = experts_ref(x, idx, gates, *w)
    bf = lambda t: t.bfloat16()
    ours = ops.experts(bf(x), idx, bf(gates), *map(bf, w)).double()
    torch_bf16 = experts_loop_ref(bf(x), idx, bf(gates), *map(bf, w)).double()
    err_ours = (ours - exact).abs().max().item()
    err_torch = (torch_bf16 - exact).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-3, (err_ours, err_torch)


def test_experts_rejects_trainable_weights(backend):
    x = torch.randn(4, 3)
    idx, gates = random_routing(4, 2, 1, torch.float32, "cpu")
    w1, b1, w2, b2 = make_experts(2, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="frozen.*w1"):
        ops.experts(x, idx, gates, w1.requires_grad_(), b1, w2, b2)


def test_experts_flop_formula_counts_selected_pairs():
    T, d, N, h, k = 16, 8, 4, 12, 2
    x = torch.randn(T, d, requires_grad=True)
    idx, gates = random_routing(T, N, k, torch.float32, "cpu")
    w = make_experts(N, d, h, torch.float32)
    pairs = int((idx >= 0).sum())
    with FlopCounterMode(display=False) as fc:
        ops.experts(x, idx, gates, *w).sum().backward()
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.some.experts] == 4 * pairs * d * h
    assert counts[torch.ops.some.experts_backward] == 4 * pairs * d * h  # grad_x only: 2 GEMMs


# ----------------------------------------------------------------- key store


def test_keystore_stats_matches_reference(device, backend):
    T, d, N, k = 40, 7, 6, 3
    q = torch.randn(T, d, dtype=torch.float64, device=device)
    idx, gates = random_routing(T, N, k, torch.float64, device)
    got = ops.keystore_stats(q, idx, gates, N)
    ref = keystore_stats_ref(q.cpu(), idx.cpu(), gates.cpu(), N)
    for a, b, name in zip(got, ref, ("sum_q", "mass", "counts", "coselect")):
        torch.testing.assert_close(a.cpu(), b, msg=name)
    assert got.counts.dtype == torch.long and got.coselect.dtype == torch.long
    assert got.sum_q.dtype == torch.float64


def test_keystore_stats_sum_over_batches(backend):
    q = torch.randn(30, 5)
    idx, gates = random_routing(30, 4, 2, torch.float32, "cpu")
    whole = ops.keystore_stats(q, idx, gates, 4)
    parts = ops.keystore_stats(q[:11], idx[:11], gates[:11], 4) + ops.keystore_stats(q[11:], idx[11:], gates[11:], 4)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b)


def test_keystore_stats_bfloat16_accumulates_in_float32(backend):
    q = torch.randn(20, 6).bfloat16()
    idx, gates = random_routing(20, 5, 2, torch.bfloat16, "cpu")
    got = ops.keystore_stats(q, idx, gates, 5)
    assert got.sum_q.dtype == torch.float32
    ref = keystore_stats_ref(q.double(), idx, gates.double(), 5)
    torch.testing.assert_close(got.sum_q.double(), ref[0], atol=1e-5, rtol=1e-5)


RULES = {
    "attraction": dict(alpha=0.3, beta=0.0, delta=0.0, ema_decay=0.0),
    "peer_pull": dict(alpha=0.0, beta=0.3, delta=0.0, ema_decay=0.0),
    "repulsion": dict(alpha=0.0, beta=0.0, delta=0.3, ema_decay=0.0),
    "inertia_only": dict(alpha=0.0, beta=0.0, delta=0.0, ema_decay=0.9),
    "all": dict(alpha=0.01, beta=0.005, delta=0.001, ema_decay=0.99),
    "all_strong": dict(alpha=0.2, beta=0.1, delta=0.05, ema_decay=0.5),
}


def keystore_case(N=8, d=6, T=50, k=3, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    K = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=1)
    V = 0.01 * torch.randn(N, d, generator=g, dtype=torch.float64)
    u = torch.rand(N, generator=g, dtype=torch.float64)
    q = torch.randn(T, d, generator=g, dtype=torch.float64)
    idx, gates = random_routing(T, N, k, torch.float64, "cpu", seed=seed)
    to = lambda t: t.to(device=device, dtype=dtype)
    return to(K), to(V), to(u), q.to(device), idx.to(device), gates.to(device)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("normalize", [True, False])
def test_keystore_update_matches_reference(rule, normalize, device, backend):
    K, V, u, q, idx, gates = keystore_case(device=device)
    stats = ops.keystore_stats(q, idx, gates, K.shape[0])
    kw = dict(RULES[rule], theta_percentile=0.2)
    ref = keystore_update_ref(K.cpu(), V.cpu(), u.cpu(), *[s.cpu() for s in stats], normalize=normalize, **kw)
    K0 = K.clone()
    assert ops.keystore_update(K, V, u, *stats, normalize=normalize, **kw)
    assert not torch.equal(K, K0), "the update must move the keys"
    for got, want, name in zip((K, V, u), ref, ("keys", "velocity", "usage")):
        torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=1e-10, msg=name)


def test_keystore_update_float32_close_to_reference(backend):
    K, V, u, q, idx, gates = keystore_case(N=16, d=12, dtype=torch.float32)
    stats = ops.keystore_stats(q, idx, gates, 16)
    stats32 = [s.float() if s.is_floating_point() else s for s in stats]
    ref = keystore_update_ref(K, V, u, *stats, alpha=0.2, beta=0.1, delta=0.05, theta_percentile=0.05, ema_decay=0.5)
    assert ops.keystore_update(K, V, u, *stats32, 0.2, 0.1, 0.05, 0.05, 0.5)
    for got, want in zip((K, V, u), ref):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_keystore_update_single_expert_and_no_tokens(backend):
    K, V, u, q, idx, gates = keystore_case(N=1, d=5, k=1)
    stats = ops.keystore_stats(q, idx, gates, 1)
    ref = keystore_update_ref(K, V, u, *stats, 0.1, 0.1, 0.1, 0.05, 0.5)
    assert ops.keystore_update(K, V, u, *stats, 0.1, 0.1, 0.1, 0.05, 0.5)
    torch.testing.assert_close(K, ref[0])
    # a step where no token picked any expert: attraction/peer-pull are 0
    K, V, u, q, idx, gates = keystore_case(N=5, d=4)
    idx.fill_(-1)
    stats = ops.keystore_stats(q, idx, gates, 5)
    ref = keystore_update_ref(K, V, u, *stats, 0.1, 0.1, 0.1, 0.3, 0.5)
    assert ops.keystore_update(K, V, u, *stats, 0.1, 0.1, 0.1, 0.3, 0.5)
    for got, want in zip((K, V, u), ref):
        torch.testing.assert_close(got, want)


def test_keystore_opcheck(device):
    K, V, u, q, idx, gates = keystore_case(dtype=torch.float32, device=device)
    q = q.float()
    torch.library.opcheck(torch.ops.some.keystore_stats.default, (q, idx, gates.float(), 8))
    stats = ops.keystore_stats(q, idx, gates, 8)
    torch.library.opcheck(torch.ops.some.keystore_update.default,
                          (K, V, u, *update_op_inputs(stats, K), 0.01, 0.005, 0.001, 0.05, 0.99, True))


# ------------------------------------------------------------ determinism


def test_ops_bit_identical_across_runs(backend):
    torch.manual_seed(0)
    T, d, N, h, k = 300, 24, 16, 40, 4
    q = torch.randn(T, d, requires_grad=True)
    x = torch.randn(T, d, requires_grad=True)
    K = torch.randn(N, d)
    w = make_experts(N, d, h, torch.float32)

    def run():
        q.grad = x.grad = None
        r = ops.route(q, K, k, 0.8)
        y = ops.experts(x, r.indices, r.gates, *w)
        (y.square().sum()).backward()
        st = ops.keystore_stats(q, r.indices, r.gates, N)
        K2, V2, u2 = K.clone(), torch.zeros(N, d), torch.zeros(N)
        ops.keystore_update(K2, V2, u2, *st, 0.01, 0.005, 0.001, 0.05, 0.99)
        return [y, q.grad.clone(), x.grad.clone(), K2, V2, u2, *st]

    a, b = run(), run()
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --------------------------------------------------------------- bad input


def test_route_bad_inputs(backend):
    q, K, thr = make_route_inputs(4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="k must be in 1..N"):
        ops.route(q, K, 0, 0.8)
    with pytest.raises(ValueError, match="k must be in 1..N"):
        ops.route(q, K, 6, 0.8)
    with pytest.raises(ValueError, match="width d|dimension 1"):
        ops.route(q, torch.randn(5, 4), 2, 0.8)
    with pytest.raises(ValueError, match="2-D"):
        ops.route(q[0], K, 2, 0.8)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        ops.route(q.to(torch.int32), K, 2, 0.8)
    with pytest.raises(ValueError, match="temperature"):
        ops.route(q, K, 2, 0.0)
    with pytest.raises(ValueError, match="unknown gating"):
        ops.route(q, K, 2, 0.8, "argmax")
    with pytest.raises(ValueError, match="thresholds"):
        ops.route(q, K, 2, 0.8, "top_any")
    if backend == "native":
        with pytest.raises(ValueError, match="thresholds"):
            torch.ops.some.route(q, K, 2, 0.8, "top_any")  # the kernel checks too
    with pytest.raises(ValueError, match="top_p"):
        ops.route(q, K, 2, 0.8, "top_p", top_p=1.5)
    with pytest.raises(ValueError, match="same device"):
        ops.route(q, K.to("meta"), 2, 0.8)
    with pytest.raises(ValueError, match="active"):
        ops.route(q, K, 2, 0.8, active=torch.ones(4, dtype=torch.bool))


def test_experts_bad_inputs(backend):
    T, d, N, h, k = 6, 4, 3, 5, 2
    x = torch.randn(T, d)
    idx, gates = random_routing(T, N, k, torch.float32, "cpu", empty_frac=0)
    w1, b1, w2, b2 = make_experts(N, d, h, torch.float32)
    bad_idx = idx.clone()
    bad_idx[2, 1] = N
    with pytest.raises(IndexError, match=r"indices must be in -1\.\.N-1"):
        ops.experts(x, bad_idx, gates, w1, b1, w2, b2)
    bad_idx[2, 1] = -2
    with pytest.raises(IndexError, match="found -2"):
        ops.experts(x, bad_idx, gates, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="'gates' has shape"):
        ops.experts(x, idx, gates[:, :1], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="'w1'.*model width"):
        ops.experts(x, idx, gates, w1[:, :, :3].contiguous(), b1, w2, b2)
    with pytest.raises(ValueError, match="'b2'"):
        ops.experts(x, idx, gates, w1, b1, w2, b2[:2])
    with pytest.raises(TypeError, match="'gates' has dtype"):
        ops.experts(x, idx, gates.double(), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="'indices' must be Long"):
        ops.experts(x, idx.int(), gates, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="same device"):
        ops.experts(x, idx, gates, w1.to("meta"), b1, w2, b2)
    strided = w1.transpose(1, 2).contiguous().transpose(1, 2)
    if backend == "native":  # the kernels read the weights in place; the torch backend takes any strides
        with pytest.raises(ValueError, match="contiguous"):
            ops.experts(x, idx, gates, strided, b1, w2, b2)
    else:
        torch.testing.assert_close(ops.experts(x, idx, gates, strided, b1, w2, b2),
                                   ops.experts(x, idx, gates, w1, b1, w2, b2))
    with pytest.raises(ValueError, match="number of tokens"):
        ops.experts(x[:5], idx, gates, w1, b1, w2, b2)


def test_keystore_stats_rejects_nonfinite_query_and_keys_stay(backend):
    K, V, u, q, idx, gates = keystore_case()
    q[3, 1] = float("nan")
    K0 = K.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.keystore_stats(q, idx, gates, K.shape[0])
    q[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.keystore_stats(q, idx, gates, K.shape[0])
    assert torch.equal(K, K0)
    bad = idx.clone()
    bad[0, 0] = 99
    with pytest.raises(IndexError, match="indices must be in"):
        ops.keystore_stats(q.nan_to_num(), bad, gates, K.shape[0])
    with pytest.raises(ValueError, match="num_experts"):
        ops.keystore_stats(q.nan_to_num(), idx, gates, 0)


def test_keystore_update_nonfinite_stats_leave_store_untouched(backend):
    K, V, u, q, idx, gates = keystore_case()
    stats = list(ops.keystore_stats(q, idx, gates, K.shape[0]))
    stats[0][2, 2] = float("nan")
    K0, V0, u0 = K.clone(), V.clone(), u.clone()
    with pytest.warns(RuntimeWarning, match="left untouched"):
        applied = ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 0.05, 0.99)
    assert applied is False
    assert torch.equal(K, K0) and torch.equal(V, V0) and torch.equal(u, u0)


def test_keystore_update_bad_inputs(backend):
    K, V, u, q, idx, gates = keystore_case(dtype=torch.float32)
    stats = ops.keystore_stats(q.float(), idx, gates.float(), K.shape[0])
    args = (0.01, 0.005, 0.001, 0.05, 0.99)
    with pytest.raises(ValueError, match="'velocity' has shape"):
        ops.keystore_update(K, V[:3], u, *stats, *args)
    with pytest.raises(ValueError, match="'coselect' must have shape"):
        ops.keystore_update(K, V, u, stats[0], stats[1], stats[2], stats[3][:2], *args)
    with pytest.raises(TypeError, match="'counts' must be Long"):
        ops.keystore_update(K, V, u, stats[0], stats[1], stats[2].float(), stats[3], *args)
    with pytest.raises(TypeError, match="'sum_q' has dtype"):
        ops.keystore_update(K, V, u, stats[0].double(), *stats[1:], *args)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.keystore_update(K.bfloat16(), V, u, *stats, *args)
    with pytest.raises(ValueError, match="theta_percentile"):
        ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 1.5, 0.99)
    with pytest.raises(ValueError, match="ema_decay"):
        ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 0.05, -0.1)
    if backend == "native":  # updated in place by the kernel; the torch backend takes any strides
        with pytest.raises(ValueError, match="contiguous"):
            Kt = torch.randn(K.shape[1], K.shape[0]).T
            ops.keystore_update(Kt, V, u, *stats, *args)
    with pytest.raises(ValueError, match="same device"):
        ops.keystore_update(K, V, u, stats[0].to("meta"), *stats[1:], *args)


# ------------------------------------------------------------- tracing


def test_ops_trace_under_torch_compile():
    """Fake kernels + autograd registration let the ops trace (aot_eager keeps it fast)."""
    T, d, N, h, k = 12, 8, 4, 6, 2
    q = torch.randn(T, d, requires_grad=True)
    x = torch.randn(T, d, requires_grad=True)
    K = torch.randn(N, d)
    w = make_experts(N, d, h, torch.float32)

    def f(q, x):
        r = ops.route(q, K, k, 0.8)
        return ops.experts(x, r.indices, r.gates, *w)

    eager = f(q, x)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert q.grad is not None and x.grad is not None


def test_meta_device_shapes():
    T, d, N, h, k = 12, 8, 4, 6, 2
    dev = torch.device("meta")
    q = torch.empty(T, d, device=dev)
    K = torch.empty(N, d, device=dev)
    r = ops.route(q, K, k, 0.8)
    assert r.indices.shape == (T, k) and r.indices.dtype == torch.long
    w1, b1, w2, b2 = (torch.empty(*s, device=dev) for s in ((N, h, d), (N, h), (N, d, h), (N, d)))
    y = ops.experts(torch.empty(T, d, device=dev), r.indices, r.gates, w1, b1, w2, b2)
    assert y.shape == (T, d) and y.device.type == "meta"


def test_non_contiguous_inputs_are_handled(backend):
    """Expanded (stride-0) and transposed inputs, as sequence-level routing of a
    single sequence produces them: same result as contiguous copies, no crash."""
    T, d, N, h, k = 9, 6, 5, 7, 2
    w = make_experts(N, d, h, torch.float64)
    x = torch.randn(d, T, dtype=torch.float64).T  # non-contiguous rows
    idx = torch.tensor([[3, 1]]).expand(T, k)  # stride (0, 1)
    gates = torch.tensor([[0.7, 0.3]], dtype=torch.float64).expand(T, k)
    assert not x.is_contiguous() and not idx.is_contiguous()
    y = ops.experts(x, idx, gates, *w)
    torch.testing.assert_close(y, ops.experts(x.contiguous(), idx.contiguous(), gates.contiguous(), *w))
    q = torch.randn(d, T, dtype=torch.float64).T
    r = ops.route(q, torch.randn(N, d, dtype=torch.float64), k, 0.8)
    st = ops.keystore_stats(q, idx, gates, N)
    st2 = ops.keystore_stats(q.contiguous(), idx.contiguous(), gates.contiguous(), N)
    for a, b in zip(st, st2):
        torch.testing.assert_close(a, b)
    assert r.indices.shape == (T, k)
