"""The CUDA kernels of the SoME ops (csrc/cuda) against the CPU kernels and the
plain-PyTorch reference (some/ops/reference.py): values and gradients at
dtype-aware tolerances, awkward sizes, opcheck, bad input, determinism, and
the absence of host synchronization in route / experts / keystore_stats.

Skipped unless a CUDA device is present and `some` was built with its CUDA
kernels. CUDA-specific behaviour (no host sync) is documented in
csrc/cuda/*.cu:
  * `keystore_stats` does not raise on NaN/Inf (that needs a sync): they
    propagate, and `keystore_update` then leaves the store untouched;
  * expert indices outside -1..N-1 are dropped like -1 slots unless the
    environment variable SOME_CHECK_INDICES=1 asks for the CPU's IndexError.
"""
from __future__ import annotations

import functools

import inputs
import pytest
import torch
import torch.nn.functional as F

import some
from some import ops
from some.ops.reference import experts_loop_ref, experts_ref, keystore_stats_ref, keystore_update_ref, route_ref

CUDA_OK = torch.cuda.is_available() and bool(some.build_info()["cuda"])
pytestmark = pytest.mark.skipif(
    not CUDA_OK,
    reason="needs a CUDA device and `some` built with its CUDA kernels (some.build_info()['cuda'])",
)

DEV = "cuda"
GATINGS = ops.GATINGS
# GPU vs CPU/reference: same precision, different summation order.
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=1e-5, rtol=1e-4)}


# the shared builders, on the GPU unless told otherwise
make_route_inputs = functools.partial(inputs.make_route_inputs, device=DEV)
make_experts = functools.partial(inputs.make_experts, device=DEV)
random_routing = functools.partial(inputs.random_routing, device=DEV)


def cpu(ts):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]


def test_cuda_kernels_registered():
    for name in ("route", "route_backward", "experts", "experts_backward", "keystore_stats", "keystore_update"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"some::{name}", "CUDA"), name


# ----------------------------------------------------------------- route


def _route_and_grads(q, K, k, temp, gating, wg, ws, **kw):
    q = q.clone().requires_grad_()
    r = ops.route(q, K, k, temp, gating, **kw)
    (r.gates * wg).sum().add((r.scores * ws).sum()).backward()
    return r, q.grad


@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("score_mode", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,d,N,k", [(23, 11, 9, 3), (1, 5, 1, 1), (17, 9, 40, 40), (50, 33, 70, 5)])
def test_route_matches_cpu_and_reference(gating, score_mode, dtype, T, d, N, k):
    q, K, thr = make_route_inputs(T, d, N, dtype)
    temp = 0.8 if score_mode == "cosine" else 3.0
    kw = dict(score_mode=score_mode, thresholds=thr if gating == "top_any" else None)
    g = torch.Generator().manual_seed(5)
    wg = torch.randn(T, k, generator=g, dtype=torch.float64).to(DEV, dtype)
    ws = torch.randn(T, k, generator=g, dtype=torch.float64).to(DEV, dtype)
    got, got_grad = _route_and_grads(q, K, k, temp, gating, wg, ws, **kw)
    kw_cpu = dict(kw, thresholds=kw["thresholds"].cpu() if kw["thresholds"] is not None else None)
    want, want_grad = _route_and_grads(q.cpu(), K.cpu(), k, temp, gating, wg.cpu(), ws.cpu(), **kw_cpu)
    assert got.indices.device.type == DEV and got.gates.dtype == dtype
    assert torch.equal(got.indices.cpu(), want.indices), "selected experts differ from the CPU op"
    torch.testing.assert_close(got.gates.cpu(), want.gates, **TOL[dtype])
    torch.testing.assert_close(got.scores.cpu(), want.scores, **TOL[dtype])
    torch.testing.assert_close(got_grad.cpu(), want_grad, **TOL[dtype])
    # and the plain-PyTorch reference
    qr = q.cpu().clone().requires_grad_()
    ref = route_ref(qr, K.cpu(), k, temp, gating, **kw_cpu)
    assert torch.equal(got.indices.cpu(), ref[0])
    torch.testing.assert_close(got.gates.cpu(), ref[1].detach(), **TOL[dtype])
    (ref[1] * wg.cpu()).sum().add((ref[2] * ws.cpu()).sum()).backward()
    torch.testing.assert_close(got_grad.cpu(), qr.grad, **TOL[dtype])


def test_route_top_any_threshold_gradient_and_fallback():
    q, K, thr = make_route_inputs(31, 8, 6)
    thr1, thr2 = thr.clone().requires_grad_(), thr.cpu().clone().requires_grad_()
    q1, q2 = q.clone().requires_grad_(), q.cpu().clone().requires_grad_()
    got = ops.route(q1, K, 4, 0.5, "top_any", thresholds=thr1)
    ref = route_ref(q2, K.cpu(), 4, 0.5, "top_any", thresholds=thr2)
    w = torch.randn(31, 4, dtype=torch.float64)
    (got.gates * w.to(DEV)).sum().backward()
    (ref[1] * w).sum().backward()
    assert thr2.grad.abs().sum() > 0
    torch.testing.assert_close(thr1.grad.cpu(), thr2.grad)
    torch.testing.assert_close(q1.grad.cpu(), q2.grad)

    high = torch.full((6,), 100.0, dtype=torch.float64, device=DEV)  # nothing can fire
    r = ops.route(q, K, 3, 0.8, "top_any", thresholds=high)
    assert (r.indices == -1).all() and (r.gates == 0).all() and (r.scores == 0).all()
    r = ops.route(q, K, 3, 0.8, "top_any", thresholds=high, fallback_top1=True)
    best = (F.normalize(q, dim=-1) @ F.normalize(K, dim=-1).T).argmax(1)
    assert torch.equal(r.indices[:, 0], best)
    assert (r.gates[:, 0] == 1).all() and (r.indices[:, 1:] == -1).all()


def test_route_active_mask_top_p_and_large_k():
    q, K, _ = make_route_inputs(50, 8, 37)
    active = torch.rand(37, generator=torch.Generator().manual_seed(2)) > 0.3
    for gating in ("softmax", "top_p", "sigmoid"):
        for k in (5, 37):
            r = ops.route(q, K, k, 0.1, gating, active=active.to(DEV))
            ref = ops.route(q.cpu(), K.cpu(), k, 0.1, gating, active=active)
            assert torch.equal(r.indices.cpu(), ref.indices)
            torch.testing.assert_close(r.gates.cpu(), ref.gates)
            chosen = r.indices[r.indices >= 0].cpu()
            assert active[chosen].all()
    r = ops.route(q, K, 37, 0.1, "top_p", top_p=0.4)
    P = torch.softmax(F.normalize(q, dim=-1) @ F.normalize(K, dim=-1).T / 0.1, dim=1)
    for t in range(50):
        n = int((r.indices[t] >= 0).sum())
        cum = torch.cumsum(r.gates[t, :n], 0)
        assert cum[-1] >= 0.4 - 1e-12 and (n == 1 or cum[-2] < 0.4)
        torch.testing.assert_close(r.gates[t, :n], P[t, r.indices[t, :n]])


def test_route_ties_prefer_lower_index():
    K = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64, device=DEV)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64, device=DEV)
    assert ops.route(q, K, 3, 0.8).indices.tolist() == [[0, 2, 3]]
    assert ops.route(q, K, 4, 0.8).indices.tolist() == [[0, 2, 3, 1]]
    K40 = torch.zeros(40, 2, dtype=torch.float64, device=DEV)
    K40[:, 0] = 1.0
    assert ops.route(q, K40, 40, 0.8).indices.tolist() == [list(range(40))]


def test_route_bfloat16_close_to_cpu():
    q, K, _ = make_route_inputs(64, 32, 16, torch.float32)
    r = ops.route(q.bfloat16(), K, 4, 0.8)
    ref = ops.route(q.bfloat16().cpu(), K.cpu(), 4, 0.8)
    assert r.gates.dtype == torch.bfloat16 and r.indices.dtype == torch.long
    same = (r.indices.cpu() == ref.indices).all(1)
    assert same.float().mean() > 0.95  # the GEMMs' rounding may swap near-tied experts
    torch.testing.assert_close(r.gates.cpu()[same].float(), ref.gates[same].float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("gating", GATINGS)
def test_route_gradcheck(gating):
    q, K, thr = make_route_inputs(7, 5, 6, seed=3)
    q.requires_grad_()

    def f(q):
        r = ops.route(q, K, 3, 0.7, gating, thresholds=thr if gating == "top_any" else None)
        return (r.scores,) if gating == "top_any" else (r.gates, r.scores)

    assert torch.autograd.gradcheck(f, (q,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("gating", ["softmax", "top_p", "top_any"])
def test_route_opcheck(gating):
    q, K, thr = make_route_inputs(9, 6, 5, torch.float32)
    q.requires_grad_()
    th = thr.clone().requires_grad_() if gating == "top_any" else None
    torch.library.opcheck(torch.ops.some.route.default, (q, K, 3, 0.8, gating, "cosine", 0.4, th, None, False))


# ----------------------------------------------------------------- experts


def _experts_fwd_bwd(x, idx, gates, w, wy, need_x=True, need_g=True):
    x = x.clone().requires_grad_(need_x)
    gates = gates.clone().requires_grad_(need_g)
    y = ops.experts(x, idx, gates, *w)
    inputs = [t for t, need in ((x, need_x), (gates, need_g)) if need]
    grads = torch.autograd.grad((y * wy).sum(), inputs) if inputs else ()
    return y, grads


EXPERT_SIZES = [
    (37, 13, 6, 17, 3),    # odd d and h
    (1, 8, 4, 8, 4),       # T = 1, k = N
    (5, 7, 1, 9, 1),       # N = 1
    (64, 16, 8, 32, 8),    # k = N
    (300, 72, 5, 136, 2),  # several row and column tiles per expert
    (130, 64, 3, 128, 2),  # widths that take the 16-byte bfloat16 loads
    (200, 33, 4, 70, 3),   # nothing a multiple of a tile
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,d,N,h,k", EXPERT_SIZES)
def test_experts_matches_cpu_and_reference(T, d, N, h, k, dtype):
    x = torch.randn(T, d, dtype=dtype, device=DEV)
    idx, gates = random_routing(T, N, k, dtype)
    w = make_experts(N, d, h, dtype)
    wy = torch.randn(T, d, dtype=dtype, device=DEV)
    y, (gx, gg) = _experts_fwd_bwd(x, idx, gates, w, wy)
    y_c, (gx_c, gg_c) = _experts_fwd_bwd(*cpu((x, idx, gates)), cpu(w), wy.cpu())
    torch.testing.assert_close(y.cpu(), y_c, **TOL[dtype])
    torch.testing.assert_close(gx.cpu(), gx_c, **TOL[dtype])
    torch.testing.assert_close(gg.cpu(), gg_c, **TOL[dtype])
    ref = experts_ref(*cpu((x, idx, gates)), *cpu(w))
    torch.testing.assert_close(y.cpu(), ref, **TOL[dtype])
    # the saved grouping is the CPU's, exactly; hidden matches too
    out = torch.ops.some.experts(x, idx, gates, *w)
    out_c = torch.ops.some.experts(*cpu((x, idx, gates)), *cpu(w))
    assert torch.equal(out[2].cpu(), out_c[2]), "order differs from the CPU grouping"
    assert torch.equal(out[3].cpu(), out_c[3]), "offsets differ from the CPU grouping"
    torch.testing.assert_close(out[1].cpu(), out_c[1], **TOL[dtype])


@pytest.mark.parametrize("need_x,need_g", [(True, False), (False, True)])
def test_experts_partial_gradients(need_x, need_g):
    T, d, N, h, k = 90, 20, 5, 40, 3
    x = torch.randn(T, d, dtype=torch.float64, device=DEV)
    idx, gates = random_routing(T, N, k, torch.float64)
    w = make_experts(N, d, h)
    wy = torch.randn(T, d, dtype=torch.float64, device=DEV)
    _, grads = _experts_fwd_bwd(x, idx, gates, w, wy, need_x, need_g)
    _, grads_c = _experts_fwd_bwd(*cpu((x, idx, gates)), cpu(w), wy.cpu(), need_x, need_g)
    assert len(grads) == 1
    torch.testing.assert_close(grads[0].cpu(), grads_c[0], **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_experts_skewed_and_empty_routing(dtype):
    """All pairs on one expert (one long segment, many row tiles, empty experts),
    and a batch where every slot is empty."""
    T, d, N, h, k = 300, 24, 6, 40, 2
    x = torch.randn(T, d, dtype=torch.float64, device=DEV).to(dtype)
    idx = torch.full((T, k), -1, dtype=torch.long, device=DEV)
    idx[:, 0] = 4
    idx[::3, 1] = 1
    gates = torch.rand(T, k, dtype=torch.float64, device=DEV).to(dtype) * (idx >= 0)
    w = make_experts(N, d, h, dtype)
    wy = torch.randn(T, d, dtype=torch.float64, device=DEV).to(dtype)
    y, (gx, gg) = _experts_fwd_bwd(x, idx, gates, w, wy)
    y_c, (gx_c, gg_c) = _experts_fwd_bwd(*cpu((x, idx, gates)), cpu(w), wy.cpu())
    for a, b in ((y, y_c), (gx, gx_c), (gg, gg_c)):
        if dtype == torch.bfloat16:  # two bf16 computations with different roundings
            assert (a.cpu().double() - b.double()).abs().max() <= 0.03 * b.double().abs().max() + 1e-2
        else:
            torch.testing.assert_close(a.cpu(), b, **TOL[dtype])
    assert (gg[idx < 0] == 0).all()

    idx.fill_(-1)
    y, (gx, gg) = _experts_fwd_bwd(x, idx, gates * 0, w, wy)
    assert (y == 0).all() and (gx == 0).all() and (gg == 0).all()
    y, hidden, order, offsets = torch.ops.some.experts(x, idx, gates, *w)
    assert (hidden == 0).all() and (order == -1).all() and (offsets == 0).all()


def test_experts_no_tokens():
    d, N, h, k = 8, 3, 5, 2
    x = torch.randn(0, d, device=DEV)
    idx = torch.zeros(0, k, dtype=torch.long, device=DEV)
    w = make_experts(N, d, h, torch.float32)
    y, hidden, order, offsets = torch.ops.some.experts(x, idx, torch.zeros(0, k, device=DEV), *w)
    assert y.shape == (0, d) and hidden.shape == (0, h) and order.shape == (0,)
    assert offsets.tolist() == [0] * (N + 1)


@pytest.mark.parametrize("d,h", [(64, 128), (62, 130), (13, 17)])
def test_experts_bfloat16_error_no_worse_than_pytorch(d, h):
    """bf16 with fp32 accumulation (tensor cores): the op's error against an fp64
    reference is within a small factor of plain PyTorch's own bf16 error, for
    the forward and both gradients. (62, 130) and (13, 17) take the scalar-load
    path, (64, 128) the 16-byte one."""
    T, N, k = 96, 8, 2
    x = torch.randn(T, d, dtype=torch.float64, device=DEV)
    idx, gates = random_routing(T, N, k, torch.float64, empty_frac=0)
    w = make_experts(N, d, h)
    wy = torch.randn(T, d, dtype=torch.float64, device=DEV)

    def run(fn, dt):
        xx = x.to(dt).requires_grad_()
        gg = gates.to(dt).requires_grad_()
        y = fn(xx, idx, gg, *(t.to(dt) for t in w))
        gx, ggr = torch.autograd.grad((y * wy.to(dt)).sum(), (xx, gg))
        return [t.double() for t in (y, gx, ggr)]

    exact = run(experts_ref, torch.float64)
    ours = run(ops.experts, torch.bfloat16)
    torch_bf16 = run(experts_loop_ref, torch.bfloat16)
    for name, a, b, e in zip(("y", "grad_x", "grad_gates"), ours, torch_bf16, exact):
        err_ours = (a - e).abs().max().item()
        err_torch = (b - e).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-3 * max(1.0, e.abs().max().item()), (name, err_ours, err_torch)


def test_experts_gradcheck():
    T, d, N, h, k = 6, 5, 3, 7, 2
    x = torch.randn(T, d, dtype=torch.float64, device=DEV, requires_grad=True)
    idx, gates = random_routing(T, N, k, torch.float64)
    gates.requires_grad_()
    w = make_experts(N, d, h)
    assert torch.autograd.gradcheck(lambda x, g: ops.experts(x, idx, g, *w), (x, gates))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_opcheck(dtype):
    T, d, N, h, k = 10, 6, 4, 5, 2
    x = torch.randn(T, d, device=DEV, dtype=dtype, requires_grad=True)
    idx, gates = random_routing(T, N, k, dtype)
    gates.requires_grad_()
    w = make_experts(N, d, h, dtype)
    torch.library.opcheck(torch.ops.some.experts.default, (x, idx, gates, *w))


# ----------------------------------------------------------------- key store


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,d,N,k", [(40, 7, 6, 3), (1, 4, 1, 1), (500, 33, 9, 4), (70, 5, 40, 40)])
def test_keystore_stats_matches_cpu_and_reference(T, d, N, k, dtype):
    q = torch.randn(T, d, dtype=torch.float64, device=DEV).to(dtype)
    idx, gates = random_routing(T, N, k, dtype)
    got = ops.keystore_stats(q, idx, gates, N)
    want = ops.keystore_stats(q.cpu(), idx.cpu(), gates.cpu(), N)
    ref = keystore_stats_ref(q.cpu().double(), idx.cpu(), gates.cpu().double(), N)
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for a, b, r, name in zip(got, want, ref, ("sum_q", "mass", "counts", "coselect")):
        assert a.dtype == b.dtype and a.device.type == DEV, name
        if a.is_floating_point():
            torch.testing.assert_close(a.cpu(), b, **tol, msg=name)
            torch.testing.assert_close(a.cpu().double(), r, **tol, msg=name)
        else:
            assert torch.equal(a.cpu(), b) and torch.equal(a.cpu(), r), name


def test_keystore_stats_sum_over_batches():
    q = torch.randn(30, 5, device=DEV)
    idx, gates = random_routing(30, 4, 2, torch.float32)
    whole = ops.keystore_stats(q, idx, gates, 4)
    parts = ops.keystore_stats(q[:11], idx[:11], gates[:11], 4) + ops.keystore_stats(q[11:], idx[11:], gates[11:], 4)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b)


RULES = {
    "attraction": dict(alpha=0.3, beta=0.0, delta=0.0, ema_decay=0.0),
    "peer_pull": dict(alpha=0.0, beta=0.3, delta=0.0, ema_decay=0.0),
    "repulsion": dict(alpha=0.0, beta=0.0, delta=0.3, ema_decay=0.0),
    "inertia_only": dict(alpha=0.0, beta=0.0, delta=0.0, ema_decay=0.9),
    "all": dict(alpha=0.01, beta=0.005, delta=0.001, ema_decay=0.99),
    "all_strong": dict(alpha=0.2, beta=0.1, delta=0.05, ema_decay=0.5),
}


def keystore_case(N=8, d=6, T=50, k=3, dtype=torch.float64, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=1)
    V = 0.01 * torch.randn(N, d, generator=g, dtype=torch.float64)
    u = torch.rand(N, generator=g, dtype=torch.float64)
    q = torch.randn(T, d, generator=g, dtype=torch.float64)
    idx, gates = random_routing(T, N, k, torch.float64, device="cpu", seed=seed)
    to = lambda t: t.to(device=device, dtype=dtype)
    return to(K), to(V), to(u), q.to(device), idx.to(device), gates.to(device)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("N,d", [(8, 6), (45, 70)])
def test_keystore_update_matches_reference(rule, normalize, N, d):
    K, V, u, q, idx, gates = keystore_case(N=N, d=d)
    stats = ops.keystore_stats(q, idx, gates, N)
    kw = dict(RULES[rule], theta_percentile=0.2)
    ref = keystore_update_ref(K.cpu(), V.cpu(), u.cpu(), *cpu(stats), normalize=normalize, **kw)
    K0 = K.clone()
    assert ops.keystore_update(K, V, u, *stats, normalize=normalize, **kw)
    assert not torch.equal(K, K0), "the update must move the keys"
    for got, want, name in zip((K, V, u), ref, ("keys", "velocity", "usage")):
        torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=1e-10, msg=name)


def test_keystore_update_float32_and_edge_cases():
    K, V, u, q, idx, gates = keystore_case(N=16, d=12, dtype=torch.float32)
    stats = ops.keystore_stats(q, idx, gates, 16)
    stats32 = [s.float() if s.is_floating_point() else s for s in stats]
    ref = keystore_update_ref(K.cpu(), V.cpu(), u.cpu(), *cpu(stats), alpha=0.2, beta=0.1, delta=0.05,
                              theta_percentile=0.05, ema_decay=0.5)
    assert ops.keystore_update(K, V, u, *stats32, 0.2, 0.1, 0.05, 0.05, 0.5)
    for got, want in zip((K, V, u), ref):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)
    # one expert
    K, V, u, q, idx, gates = keystore_case(N=1, d=5, k=1)
    stats = ops.keystore_stats(q, idx, gates, 1)
    ref = keystore_update_ref(K.cpu(), V.cpu(), u.cpu(), *cpu(stats), 0.1, 0.1, 0.1, 0.05, 0.5)
    assert ops.keystore_update(K, V, u, *stats, 0.1, 0.1, 0.1, 0.05, 0.5)
    torch.testing.assert_close(K.cpu(), ref[0])
    # a step where no token picked any expert
    K, V, u, q, idx, gates = keystore_case(N=5, d=4)
    idx.fill_(-1)
    stats = ops.keystore_stats(q, idx, gates, 5)
    ref = keystore_update_ref(K.cpu(), V.cpu(), u.cpu(), *cpu(stats), 0.1, 0.1, 0.1, 0.3, 0.5)
    assert ops.keystore_update(K, V, u, *stats, 0.1, 0.1, 0.1, 0.3, 0.5)
    for got, want in zip((K, V, u), ref):
        torch.testing.assert_close(got.cpu(), want)


def test_keystore_update_nonfinite_stats_leave_store_untouched():
    K, V, u, q, idx, gates = keystore_case()
    stats = list(ops.keystore_stats(q, idx, gates, K.shape[0]))
    stats[0][2, 2] = float("nan")
    K0, V0, u0 = K.clone(), V.clone(), u.clone()
    applied = torch.ops.some.keystore_update(K, V, u, *inputs.update_op_inputs(stats, K), 0.01, 0.005, 0.001, 0.05,
                                             0.99, True)
    assert applied.device.type == DEV and applied.dtype == torch.bool and not bool(applied)
    assert torch.equal(K, K0) and torch.equal(V, V0) and torch.equal(u, u0)
    with pytest.warns(RuntimeWarning, match="left untouched"):
        assert ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 0.05, 0.99) is False
    assert torch.equal(K, K0) and torch.equal(V, V0) and torch.equal(u, u0)


def test_keystore_nonfinite_query_propagates_on_cuda():
    """On CUDA keystore_stats cannot raise without a sync: NaN reaches the
    statistics, and keystore_update then refuses them."""
    K, V, u, q, idx, gates = keystore_case()
    t = int((idx >= 0).any(1).nonzero()[0])  # a token with a selected expert
    q[t, 1] = float("nan")
    stats = ops.keystore_stats(q, idx, gates, K.shape[0])
    assert not torch.isfinite(stats.sum_q).all()
    K0 = K.clone()
    with pytest.warns(RuntimeWarning, match="left untouched"):
        assert ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 0.05, 0.99) is False
    assert torch.equal(K, K0)


def test_keystore_opcheck():
    K, V, u, q, idx, gates = keystore_case(dtype=torch.float32)
    q = q.float()
    torch.library.opcheck(torch.ops.some.keystore_stats.default, (q, idx, gates.float(), 8))
    stats = ops.keystore_stats(q, idx, gates, 8)
    torch.library.opcheck(torch.ops.some.keystore_update.default,
                          (K, V, u, *inputs.update_op_inputs(stats, K), 0.01, 0.005, 0.001, 0.05, 0.99, True))


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_bit_identical_across_runs(dtype):
    torch.manual_seed(0)
    T, d, N, h, k = 700, 64, 16, 136, 4
    q = torch.randn(T, d, device=DEV, dtype=dtype, requires_grad=True)
    x = torch.randn(T, d, device=DEV, dtype=dtype, requires_grad=True)
    K = torch.randn(N, d, device=DEV)
    w = make_experts(N, d, h, dtype)

    def run():
        q.grad = x.grad = None
        r = ops.route(q, K.to(dtype), k, 0.8)
        y = ops.experts(x, r.indices, r.gates, *w)
        y.float().square().sum().backward()
        st = ops.keystore_stats(q, r.indices, r.gates, N)
        K2, V2, u2 = K.clone(), torch.zeros(N, d, device=DEV), torch.zeros(N, device=DEV)
        torch.ops.some.keystore_update(K2, V2, u2, *inputs.update_op_inputs(st, K2), 0.01, 0.005, 0.001, 0.05, 0.99,
                                       True)
        return [r.indices, r.gates, y, q.grad.clone(), x.grad.clone(), K2, V2, u2, *st]

    a, b = run(), run()
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), i


# ------------------------------------------------------------ no host sync


def test_route_experts_stats_do_not_synchronize(monkeypatch):
    """route, experts (forward and backward) and keystore_stats never wait for
    the device: the grouping, the tile schedule and every count stay on it."""
    monkeypatch.delenv("SOME_CHECK_INDICES", raising=False)  # that debug check syncs
    T, d, N, h, k = 257, 40, 12, 72, 3
    q = torch.randn(T, d, device=DEV, requires_grad=True)
    x = torch.randn(T, d, device=DEV, requires_grad=True)
    K = torch.randn(N, d, device=DEV)
    thr = torch.zeros(N, device=DEV, requires_grad=True)
    w = make_experts(N, d, h, torch.float32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gating in ("softmax", "top_p", "top_any"):
            r = ops.route(q, K, k, 0.8, gating, thresholds=thr if gating == "top_any" else None)
            y = ops.experts(x, r.indices, r.gates, *w)
            y.square().sum().backward()
            ops.keystore_stats(q.detach(), r.indices, r.gates.detach(), N)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert q.grad is not None and x.grad is not None and thr.grad is not None


def test_keystore_update_does_not_synchronize():
    K, V, u, q, idx, gates = keystore_case(N=20, d=16, dtype=torch.float32)
    stats = ops.keystore_stats(q.float(), idx, gates.float(), 20)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        applied = torch.ops.some.keystore_update(K, V, u, *inputs.update_op_inputs(stats, K), 0.01, 0.005, 0.001, 0.05,
                                             0.99, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(applied)


# --------------------------------------------------------------- bad input


def test_route_bad_inputs():
    q, K, thr = make_route_inputs(4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="k must be in 1..N"):
        ops.route(q, K, 0, 0.8)
    with pytest.raises(ValueError, match="k must be in 1..N"):
        torch.ops.some.route(q, K, 6, 0.8)
    with pytest.raises(ValueError, match="width d|dimension 1"):
        ops.route(q, torch.randn(5, 4, device=DEV), 2, 0.8)
    with pytest.raises(ValueError, match="2-D"):
        ops.route(q[0], K, 2, 0.8)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        ops.route(q.to(torch.int32), K, 2, 0.8)
    with pytest.raises(ValueError, match="temperature"):
        ops.route(q, K, 2, 0.0)
    with pytest.raises(ValueError, match="thresholds"):
        torch.ops.some.route(q, K, 2, 0.8, "top_any")
    with pytest.raises(ValueError, match="top_p"):
        ops.route(q, K, 2, 0.8, "top_p", top_p=1.5)
    with pytest.raises(ValueError, match="same device"):
        ops.route(q, K.cpu(), 2, 0.8)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.some.route(q, K.cpu(), 2, 0.8)
    with pytest.raises(ValueError, match="active"):
        ops.route(q, K, 2, 0.8, active=torch.ones(4, dtype=torch.bool, device=DEV))


def test_experts_bad_inputs():
    T, d, N, h, k = 6, 4, 3, 5, 2
    x = torch.randn(T, d, device=DEV)
    idx, gates = random_routing(T, N, k, torch.float32, empty_frac=0)
    w1, b1, w2, b2 = make_experts(N, d, h, torch.float32)
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
        ops.experts(x, idx, gates, w1.cpu(), b1, w2, b2)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.some.experts(x, idx, gates, w1.cpu(), b1, w2, b2)
    with pytest.raises(ValueError, match="contiguous"):
        ops.experts(x, idx, gates, w1.transpose(1, 2).contiguous().transpose(1, 2), b1, w2, b2)
    with pytest.raises(ValueError, match="number of tokens"):
        ops.experts(x[:5], idx, gates, w1, b1, w2, b2)


def test_experts_out_of_range_indices(monkeypatch):
    """Without a sync they cannot raise: such slots are dropped like -1 (and
    never dereferenced). SOME_CHECK_INDICES=1 restores the CPU's IndexError."""
    T, d, N, h, k = 6, 4, 3, 5, 2
    x = torch.randn(T, d, device=DEV)
    idx, gates = random_routing(T, N, k, torch.float32, empty_frac=0)
    w = make_experts(N, d, h, torch.float32)
    bad = idx.clone()
    bad[2, 1] = N
    bad[4, 0] = -2
    dropped = bad.clone()
    dropped[(bad < -1) | (bad >= N)] = -1
    monkeypatch.delenv("SOME_CHECK_INDICES", raising=False)
    torch.testing.assert_close(ops.experts(x, bad, gates, *w), ops.experts(x, dropped, gates, *w))
    st = ops.keystore_stats(x, bad, gates, N)
    st_ref = ops.keystore_stats(x, dropped, gates, N)
    for a, b in zip(st, st_ref):
        torch.testing.assert_close(a, b)
    monkeypatch.setenv("SOME_CHECK_INDICES", "1")
    with pytest.raises(IndexError, match=r"indices must be in -1\.\.N-1 = -1\.\.2, found 3 at flat position 5"):
        ops.experts(x, bad, gates, *w)
    with pytest.raises(IndexError, match="indices must be in"):
        ops.keystore_stats(x, bad, gates, N)


def test_keystore_bad_inputs():
    K, V, u, q, idx, gates = keystore_case(dtype=torch.float32)
    q = q.float()
    with pytest.raises(ValueError, match="num_experts"):
        ops.keystore_stats(q, idx, gates, 0)
    with pytest.raises(ValueError, match="same device"):
        ops.keystore_stats(q, idx.cpu(), gates, 8)
    stats = ops.keystore_stats(q, idx, gates.float(), K.shape[0])
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
    with pytest.raises(ValueError, match="contiguous"):
        Kt = torch.randn(K.shape[1], K.shape[0], device=DEV).T
        ops.keystore_update(Kt, V, u, *stats, *args)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.some.keystore_update(K, V, u, stats[0].cpu(), *inputs.update_op_inputs(stats, K)[1:], *args,
                                       True)


@pytest.mark.parametrize("storage", ["materialized", "procedural"])
def test_experts_bf16_at_the_a4_shape_matches_an_fp32_loop(storage):
    """One A4-sized problem (T = 8192 tokens of d = 512, N = 64 experts of h = 1024, k = 4) in
    bfloat16 (the sm_90 grouped-GEMM path) against the float32 loop over experts on the GPU."""
    T, d, h, N, k = 8192, 512, 1024, 64, 4
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(T, d, device=DEV, generator=g)
    q = torch.randn(T, d, device=DEV, generator=g)
    keys = F.normalize(torch.randn(N, d, device=DEV, generator=g), dim=1)
    r = ops.route(q, keys, k, 0.8)
    spec = ops.ExpertSpec(0, 3, N, d, h, torch.bfloat16)
    w = [torch.empty(N, h, d, device=DEV, dtype=torch.bfloat16), torch.empty(N, h, device=DEV, dtype=torch.bfloat16),
         torch.empty(N, d, h, device=DEV, dtype=torch.bfloat16), torch.empty(N, d, device=DEV, dtype=torch.bfloat16)]
    ops.philox.fill_expert_weights(*w, spec.seed, spec.layer)
    xb = x.bfloat16().requires_grad_()
    gb = r.gates.detach().bfloat16().requires_grad_()
    if storage == "materialized":
        y = ops.experts(xb, r.indices, gb, *w)
    else:
        y = ops.procedural_experts(xb, r.indices, gb, spec)
    gy = torch.randn(T, d, device=DEV, generator=g)
    y.float().backward(gy)
    xf = xb.detach().float().requires_grad_()
    gf = gb.detach().float().requires_grad_()
    ref = experts_loop_ref(xf, r.indices, gf, *[t.float() for t in w])
    ref.backward(gy)
    for got, want in ((y.float(), ref), (xb.grad.float(), xf.grad), (gb.grad.float(), gf.grad)):
        err = (got - want).norm() / want.norm()
        assert err < 2e-2, err  # bf16 inputs and outputs, fp32 accumulation
