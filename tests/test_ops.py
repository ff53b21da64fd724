"""The SoME ops against the plain-PyTorch reference (some/ops/reference.py), on every device
(the `device` fixture: the CPU, and CUDA where there is a GPU and `some` has its CUDA kernels)
and both backends (the `backend` fixture): values, gradients, gradcheck, opcheck (native),
awkward sizes, determinism, bad input. On a GPU the ops are compared with the same op on the
CPU as well.

A few tests are CUDA-only: what the CUDA kernels do differently so as never to synchronize
with the host (csrc/cuda/*.cu), and that they do not:
  * `keystore_stats` does not raise on NaN/Inf (that needs a sync): they propagate, and
    `keystore_update` then leaves the store untouched;
  * expert indices outside -1..N-1 are dropped like -1 slots unless the environment
    variable SOME_CHECK_INDICES=1 asks for the CPU's IndexError;
and one bf16 problem at A4's shape (the sm_90 grouped-GEMM path), too big for the CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_cuda, repeatable
from inputs import make_experts, make_route_inputs, random_routing, update_op_inputs
from torch.utils.flop_counter import FlopCounterMode

from some import ops
from some.ops.reference import experts_loop_ref, experts_ref, keystore_stats_ref, keystore_update_ref, route_ref

GATINGS = ops.GATINGS
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-5)}
# A GPU against the reference or the CPU op: the same precision, another summation order.
TOL_GPU = {torch.float64: TOL[torch.float64], torch.float32: dict(atol=1e-5, rtol=1e-4)}


def tol(dtype, device):
    return (TOL if device.type == "cpu" else TOL_GPU)[dtype]


def cpu(ts):
    """CPU copies of the tensors among `ts` (anything else as it is)."""
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]


def other_device(device):
    """A device that is not `device`, for the same-device checks: the CPU next to a GPU
    (then the raw ops can be called across devices too), meta next to the CPU."""
    return torch.device("cpu" if device.type != "cpu" else "meta")


# the kernels of every op, for each device `some` claims to serve
NATIVE_OPS = ("route", "route_backward", "experts", "experts_backward", "procedural_experts",
              "procedural_experts_backward", "fill_expert_weights", "keystore_stats", "keystore_update")


def test_native_kernels_registered_for_the_device(device):
    # without a kernel for the device's dispatch key the native backend cannot serve it
    key = device.type.upper()
    missing = [n for n in NATIVE_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"some::{n}", key)]
    assert not missing, f"no {key} kernel for {missing}"


# ----------------------------------------------------------------- route


def _route_and_grads(q, K, k, temp, gating, wg, ws, **kw):
    """The op's result and the query's gradient of Σ wg·gates + ws·scores."""
    q = q.clone().requires_grad_()
    r = ops.route(q, K, k, temp, gating, **kw)
    (r.gates * wg).sum().add((r.scores * ws).sum()).backward()
    return r, q.grad


ROUTE_SIZES = [
    (23, 11, 9, 3),
    (1, 5, 1, 1),     # one token, one expert
    (17, 9, 40, 40),  # k = N = 40 > 32: the CPU kernel's large-k selection
    (50, 33, 70, 5),  # N = 70: each lane of the CUDA kernel's warp scans several experts
]


# selection bias (docs/method.md §4.1 balance_bias): chooses the top-k by s + b; the gates, the
# returned scores and the gradients are those of the unbiased scores of the chosen experts
TOPK_GATINGS = [g for g in GATINGS if g not in ("top_p", "top_any")]


def _selection_bias(N, dtype, device, scale=0.6, seed=11):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, generator=g, dtype=torch.float64) * scale).to(device, dtype)


@pytest.mark.parametrize("gating,biased", [(g, False) for g in GATINGS] + [(g, True) for g in TOPK_GATINGS])
@pytest.mark.parametrize("score_mode", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,d,N,k", ROUTE_SIZES)
def test_route_matches_reference(T, d, N, k, gating, biased, score_mode, dtype, device, backend):
    q, K, thr = make_route_inputs(T, d, N, dtype, device)
    temp = 0.8 if score_mode == "cosine" else 3.0
    kw = dict(score_mode=score_mode, thresholds=thr if gating == "top_any" else None,
              selection_bias=_selection_bias(N, dtype, device) if biased else None)
    g = torch.Generator().manual_seed(5)
    wg, ws = (torch.randn(T, k, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2))
    got, got_grad = _route_and_grads(q, K, k, temp, gating, wg, ws, **kw)
    assert got.indices.device.type == device.type and got.gates.dtype == dtype
    q2 = q.clone().requires_grad_()
    ref = route_ref(q2, K, k, temp, gating, **kw)
    assert torch.equal(got.indices.cpu(), ref[0]), "selected experts differ"
    torch.testing.assert_close(got.gates.cpu(), ref[1].detach().cpu(), **tol(dtype, device))
    torch.testing.assert_close(got.scores.cpu(), ref[2].detach().cpu(), **tol(dtype, device))
    # gradients through gates and scores together
    (ref[1] * wg).sum().add((ref[2] * ws).sum()).backward()
    torch.testing.assert_close(got_grad, q2.grad, **tol(dtype, device))
    if device.type != "cpu":  # and the same op (same backend) on the CPU
        kw_cpu = {name: v.cpu() if isinstance(v, torch.Tensor) else v for name, v in kw.items()}
        want, want_grad = _route_and_grads(q.cpu(), K.cpu(), k, temp, gating, wg.cpu(), ws.cpu(), **kw_cpu)
        assert torch.equal(got.indices.cpu(), want.indices), "selected experts differ from the CPU op"
        for a, b in ((got.gates, want.gates), (got.scores, want.scores), (got_grad, want_grad)):
            torch.testing.assert_close(a.cpu(), b, **TOL_GPU[dtype])


def test_route_top_any_threshold_gradient(device, backend):
    q, K, thr = make_route_inputs(31, 8, 6, device=device)
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


def test_route_top_any_fallback_and_empty_slots(device, backend):
    q, K, _ = make_route_inputs(10, 6, 5, device=device)
    high = torch.full((5,), 100.0, dtype=torch.float64, device=device)  # nothing can fire
    r = ops.route(q, K, 3, 0.8, "top_any", thresholds=high)
    assert (r.indices == -1).all() and (r.gates == 0).all() and (r.scores == 0).all()
    r = ops.route(q, K, 3, 0.8, "top_any", thresholds=high, fallback_top1=True)
    best = (F.normalize(q, dim=-1) @ F.normalize(K, dim=-1).T).argmax(1)
    assert torch.equal(r.indices[:, 0], best)
    assert (r.gates[:, 0] == 1).all() and (r.indices[:, 1:] == -1).all()


@pytest.mark.parametrize("N", [12, 37])  # k = N; 37 > 32: the CPU kernel's large-k selection
def test_route_top_p_takes_until_mass_reached(N, device, backend):
    T = 40
    q, K, _ = make_route_inputs(T, 8, N, device=device)
    r = ops.route(q, K, N, 0.1, "top_p", top_p=0.4)
    P = torch.softmax(F.normalize(q, dim=-1) @ F.normalize(K, dim=-1).T / 0.1, dim=1)
    for t in range(T):
        n = int((r.indices[t] >= 0).sum())
        cum = torch.cumsum(r.gates[t, :n], 0)
        assert cum[-1] >= 0.4 - 1e-12 and (n == 1 or cum[-2] < 0.4)
        torch.testing.assert_close(r.gates[t, :n], P[t, r.indices[t, :n]])


def test_route_active_mask_excludes_experts(device, backend):
    N = 37
    q, K, _ = make_route_inputs(50, 8, N, device=device)
    active = (torch.rand(N, generator=torch.Generator().manual_seed(2)) > 0.3).to(device)
    n_active = int(active.sum())
    assert 5 < n_active < N, "the case needs more active experts than k = 5 and fewer than N"
    for gating in ("softmax", "top_p", "sigmoid"):
        for k in (5, N):  # N > 32: the CPU kernel's large-k selection, and more slots than active experts
            r = ops.route(q, K, k, 0.1, gating, active=active)
            chosen = r.indices[r.indices >= 0]
            assert active[chosen].all()
            ref = route_ref(q, K, k, 0.1, gating, active=active)
            assert torch.equal(r.indices.cpu(), ref[0])
            torch.testing.assert_close(r.gates, ref[1])
            if device.type != "cpu":  # and the same op on the CPU
                want = ops.route(q.cpu(), K.cpu(), k, 0.1, gating, active=active.cpu())
                assert torch.equal(r.indices.cpu(), want.indices)
                torch.testing.assert_close(r.gates.cpu(), want.gates)
            # fewer active experts than k: the remaining slots are empty
            assert (r.indices[:, n_active:] == -1).all() and (r.gates[:, n_active:] == 0).all()


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


def test_route_ties_prefer_lower_index(device, backend):
    K = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64, device=device)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64, device=device)
    r = ops.route(q, K, 3, 0.8)
    assert r.indices.tolist() == [[0, 2, 3]]
    r = ops.route(q, K, 4, 0.8)  # k = N, large-k path uses another selection routine
    assert r.indices.tolist() == [[0, 2, 3, 1]]
    K40 = torch.zeros(40, 2, dtype=torch.float64, device=device)
    K40[:, 0] = 1.0
    r = ops.route(q, K40, 40, 0.8)
    assert r.indices.tolist() == [list(range(40))]


@pytest.mark.parametrize("gating", GATINGS)
def test_route_gradcheck(gating, device, backend):
    q, K, thr = make_route_inputs(7, 5, 6, seed=3, device=device)
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


def test_route_selection_bias_changes_only_the_choice(device, backend):
    q, K, _ = make_route_inputs(40, 6, 8, torch.float64, device)
    zero = ops.route(q, K, 3, 0.8, selection_bias=torch.zeros(8, dtype=torch.float64, device=device))
    plain = ops.route(q, K, 3, 0.8)
    for a, b in zip(zero, plain):  # a zero bias is no bias, bit for bit
        assert torch.equal(a, b)
    # a large bias on expert 5 makes every token choose it, with the gate its own score earns
    bias = torch.zeros(8, dtype=torch.float64, device=device)
    bias[5] = 10.0
    r = ops.route(q, K, 3, 0.8, selection_bias=bias)
    assert (r.indices[:, 0] == 5).all()
    torch.testing.assert_close(r.scores[:, 0], F.normalize(q, dim=1) @ F.normalize(K[5], dim=0))
    # a bias of float32 with float64 queries is taken in the accumulation dtype
    r32 = ops.route(q, K, 3, 0.8, selection_bias=bias.float())
    assert torch.equal(r32.indices, r.indices)


@pytest.mark.parametrize("gating", TOPK_GATINGS)
def test_route_selection_bias_gradcheck(gating, device, backend):
    q, K, _ = make_route_inputs(7, 5, 6, seed=3, device=device)
    bias = _selection_bias(6, torch.float64, device, scale=0.3)
    q.requires_grad_()

    def f(q):
        r = ops.route(q, K, 3, 0.7, gating, selection_bias=bias)
        return r.gates, r.scores

    assert torch.autograd.gradcheck(f, (q,), eps=1e-6, atol=1e-7)


def test_route_selection_bias_opcheck(device):
    q, K, _ = make_route_inputs(9, 6, 5, torch.float32, device)
    q.requires_grad_()
    bias = _selection_bias(5, torch.float32, device)
    torch.library.opcheck(torch.ops.some.route.default,
                          (q, K, 3, 0.8, "softmax", "cosine", 0.4, None, None, False, bias))


def test_route_selection_bias_bad_inputs(device, backend, monkeypatch):
    monkeypatch.setenv("SOME_CHECK_INDICES", "1")  # the value checks on a GPU (a host sync) are opt-in
    q, K, thr = make_route_inputs(4, 3, 5, torch.float32, device)
    bias = torch.zeros(5, device=device)
    with pytest.raises(ValueError, match="'selection_bias' has shape"):
        ops.route(q, K, 2, 0.8, selection_bias=bias[:4])
    with pytest.raises(ValueError, match="'selection_bias' must be 1-D"):
        ops.route(q, K, 2, 0.8, selection_bias=bias.reshape(1, 5))
    with pytest.raises(TypeError, match="'selection_bias' must be float32"):
        ops.route(q, K, 2, 0.8, selection_bias=bias.long())
    with pytest.raises(TypeError, match="'selection_bias' must be a torch.Tensor"):
        ops.route(q, K, 2, 0.8, selection_bias=[0.0] * 5)
    with pytest.raises(ValueError, match="same device"):
        ops.route(q, K, 2, 0.8, selection_bias=bias.to(other_device(device)))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="'selection_bias' must be finite"):
            ops.route(q, K, 2, 0.8, selection_bias=torch.tensor([0, 0, bad, 0, 0], device=device))
    # finite in float64, infinite in the float32 the scores of a float32 query are chosen in
    with pytest.raises(ValueError, match="'selection_bias' must be finite"):
        ops.route(q, K, 2, 0.8, selection_bias=torch.tensor([0, 0, 1e300, 0, 0], dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="top-k gatings.*top_p"):
        ops.route(q, K, 2, 0.8, "top_p", selection_bias=bias)
    with pytest.raises(ValueError, match="top-k gatings.*top_any"):
        ops.route(q, K, 2, 0.8, "top_any", thresholds=thr, selection_bias=bias)
    if backend == "native":  # the kernel checks too
        with pytest.raises(ValueError, match="must be finite"):
            torch.ops.some.route(q, K, 2, 0.8, selection_bias=torch.full((5,), float("nan"), device=device))
        with pytest.raises(ValueError, match="top-k gatings"):
            torch.ops.some.route(q, K, 2, 0.8, "top_p", selection_bias=bias)


def test_route_bfloat16_close_to_float32(device, backend):
    q, K, _ = make_route_inputs(64, 32, 16, torch.float32, device)
    r32 = ops.route(q, K, 4, 0.8)
    r16 = ops.route(q.bfloat16(), K, 4, 0.8)
    assert r16.gates.dtype == torch.bfloat16 and r16.indices.dtype == torch.long
    agree = (r16.indices == r32.indices).float().mean()
    assert agree > 0.9  # bf16 rounding of the query may swap near-tied experts
    same = (r16.indices == r32.indices).all(1)
    torch.testing.assert_close(r16.gates[same].float(), r32.gates[same], atol=1e-2, rtol=1e-2)
    if device.type != "cpu":  # and bf16 on the CPU: the same bf16 query, GEMMs that round differently
        want = ops.route(q.bfloat16().cpu(), K.cpu(), 4, 0.8)
        same = (r16.indices.cpu() == want.indices).all(1)
        assert same.float().mean() > 0.95
        torch.testing.assert_close(r16.gates.cpu()[same].float(), want.gates[same].float(), atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------- experts


def _experts_fwd_bwd(x, idx, gates, w, wy, need_x=True, need_g=True):
    """The op's y and the gradients of Σ wy·y to the inputs asked for (x, gates)."""
    x = x.clone().requires_grad_(need_x)
    gates = gates.clone().requires_grad_(need_g)
    y = ops.experts(x, idx, gates, *w)
    inputs = [t for t, need in ((x, need_x), (gates, need_g)) if need]
    grads = torch.autograd.grad((y * wy).sum(), inputs) if inputs else ()
    return y, grads


def _experts_ref_fwd_bwd(x, idx, gates, w, wy):
    """The same from the reference in float64 on the CPU, for inputs of any dtype."""
    x, gates = (t.to("cpu", torch.float64, copy=True).requires_grad_() for t in (x, gates))  # (not the caller's)
    w, wy = [t.cpu().double() for t in w], wy.cpu().double()
    y = experts_ref(x, idx.cpu(), gates, *w)
    return y.detach(), torch.autograd.grad((y * wy).sum(), (x, gates))


EXPERT_SIZES = [
    (37, 13, 6, 17, 3),    # odd d and h
    (1, 8, 4, 8, 4),       # T = 1, k = N
    (5, 7, 1, 9, 1),       # N = 1
    (64, 16, 8, 32, 8),    # k = N
    (300, 72, 5, 136, 2),  # several row and column tiles per expert (CUDA)
    (130, 64, 3, 128, 2),  # widths that take the CUDA kernels' 16-byte bfloat16 loads
    (200, 33, 4, 70, 3),   # nothing a multiple of a tile
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,d,N,h,k", EXPERT_SIZES)
def test_experts_matches_reference(T, d, N, h, k, dtype, device, backend):
    x = torch.randn(T, d, dtype=dtype, device=device)
    idx, gates = random_routing(T, N, k, dtype, device)
    w = make_experts(N, d, h, dtype, device)
    x1, g1 = x.clone().requires_grad_(), gates.clone().requires_grad_()
    x2, g2 = x.clone().requires_grad_(), gates.clone().requires_grad_()
    y1 = ops.experts(x1, idx, g1, *w)
    y2 = experts_ref(x2, idx, g2, *w)
    torch.testing.assert_close(y1, y2, **tol(dtype, device))
    gy = torch.randn_like(y1)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad, **tol(dtype, device))
    torch.testing.assert_close(g1.grad * (idx >= 0), g2.grad * (idx >= 0), **tol(dtype, device))
    # the naive loop over experts agrees as well (the benchmark baseline)
    torch.testing.assert_close(experts_loop_ref(x, idx, gates, *w), y2.detach(), **tol(dtype, device))
    if device.type == "cpu":
        return
    # and the same op (same backend) on the CPU
    y_c, (gx_c, gg_c) = _experts_fwd_bwd(*cpu((x, idx, gates)), cpu(w), gy.cpu())
    for a, b in ((y1, y_c), (x1.grad, gx_c), (g1.grad, gg_c)):
        torch.testing.assert_close(a.cpu(), b, **TOL_GPU[dtype])
    if backend == "native":  # the grouping saved for the backward is the CPU kernel's, exactly; hidden matches too
        out = torch.ops.some.experts(x, idx, gates, *w)
        out_c = torch.ops.some.experts(*cpu((x, idx, gates)), *cpu(w))
        assert torch.equal(out[2].cpu(), out_c[2]), "order differs from the CPU grouping"
        assert torch.equal(out[3].cpu(), out_c[3]), "offsets differ from the CPU grouping"
        torch.testing.assert_close(out[1].cpu(), out_c[1], **TOL_GPU[dtype])


@pytest.mark.parametrize("need_x,need_g", [(True, False), (False, True)])
def test_experts_partial_gradients(need_x, need_g, device, backend):
    """A gradient asked for alone (x's or the gates'; the backward skips the other) is the
    one of the full computation."""
    T, d, N, h, k = 90, 20, 5, 40, 3
    x = torch.randn(T, d, dtype=torch.float64, device=device)
    idx, gates = random_routing(T, N, k, torch.float64, device)
    w = make_experts(N, d, h, device=device)
    wy = torch.randn(T, d, dtype=torch.float64, device=device)
    _, grads = _experts_fwd_bwd(x, idx, gates, w, wy, need_x, need_g)
    assert len(grads) == 1
    _, want = _experts_ref_fwd_bwd(x, idx, gates, w, wy)
    torch.testing.assert_close(grads[0].cpu(), want[0 if need_x else 1], **TOL[torch.float64])
    if device.type != "cpu":  # and the op on the CPU
        _, grads_c = _experts_fwd_bwd(*cpu((x, idx, gates)), cpu(w), wy.cpu(), need_x, need_g)
        torch.testing.assert_close(grads[0].cpu(), grads_c[0], **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_experts_skewed_and_empty_routing(dtype, device, backend):
    """All pairs on one expert (one long segment, many row tiles, empty experts),
    and a batch where every slot is empty."""
    T, d, N, h, k = 300, 24, 6, 40, 2
    x = torch.randn(T, d, dtype=torch.float64, device=device).to(dtype)
    idx = torch.full((T, k), -1, dtype=torch.long, device=device)
    idx[:, 0] = 4
    idx[::3, 1] = 1
    gates = torch.rand(T, k, dtype=torch.float64, device=device).to(dtype) * (idx >= 0)
    w = make_experts(N, d, h, dtype, device)
    wy = torch.randn(T, d, dtype=torch.float64, device=device).to(dtype)

    def close(a, b):
        if dtype == torch.bfloat16:  # bf16 roundings in different places
            assert (a.cpu().double() - b.cpu().double()).abs().max() <= 0.03 * b.double().abs().max() + 1e-2
        else:
            torch.testing.assert_close(a.cpu().double(), b.cpu().double(), **tol(dtype, device))

    y, (gx, gg) = _experts_fwd_bwd(x, idx, gates, w, wy)
    y_r, (gx_r, gg_r) = _experts_ref_fwd_bwd(x, idx, gates, w, wy)  # from the same (rounded) inputs
    for a, b in ((y, y_r), (gx, gx_r), (gg, gg_r)):
        close(a, b)
    if device.type != "cpu":  # and the op on the CPU
        y_c, (gx_c, gg_c) = _experts_fwd_bwd(*cpu((x, idx, gates)), cpu(w), wy.cpu())
        for a, b in ((y, y_c), (gx, gx_c), (gg, gg_c)):
            close(a, b)
    assert (gg[idx < 0] == 0).all()

    idx.fill_(-1)
    y, (gx, gg) = _experts_fwd_bwd(x, idx, gates * 0, w, wy)
    assert (y == 0).all() and (gx == 0).all() and (gg == 0).all()
    if backend == "native":  # what the kernel saves for the backward: nothing grouped
        y, hidden, order, offsets = torch.ops.some.experts(x, idx, gates, *w)
        assert (hidden == 0).all() and (order == -1).all() and (offsets == 0).all()


def test_experts_no_tokens(device, backend):
    d, N, h, k = 8, 3, 5, 2
    x = torch.randn(0, d, device=device)
    idx = torch.zeros(0, k, dtype=torch.long, device=device)
    gates = torch.zeros(0, k, device=device)
    w = make_experts(N, d, h, torch.float32, device)
    assert ops.experts(x, idx, gates, *w).shape == (0, d)
    if backend == "native":  # and what the kernel saves for the backward
        y, hidden, order, offsets = torch.ops.some.experts(x, idx, gates, *w)
        assert y.shape == (0, d) and hidden.shape == (0, h) and order.shape == (0,)
        assert offsets.tolist() == [0] * (N + 1)


@pytest.mark.parametrize("d, h", [(8, 0), (0, 8)])
def test_experts_of_zero_width(d, h, device, backend):
    # an empty product (BLAS refuses a zero leading dimension) still writes its zeros
    T, N, k = 6, 3, 2
    x = torch.randn(T, d, device=device)
    idx, gates = random_routing(T, N, k, torch.float32, device=device, seed=2)
    w = make_experts(N, d, h, torch.float32, device)
    torch.testing.assert_close(ops.experts(x, idx, gates, *w), experts_ref(x, idx, gates, *w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_experts_products_have_torch_mm_bits(dtype):
    # the CPU kernel calls torch's BLAS directly for its many small per-expert products
    # (csrc/cpu/small_gemm.h) with the arguments at::mm would pass: the saved pre-activations
    # are torch.mm's bits plus the bias, for experts of 1 to many rows. (One thread: MKL picks
    # other kernels, with other bits, for a product it may thread itself.)
    import some
    if not some.build_info()["native"]:
        pytest.skip("the native extension is not built")
    if torch.backends.mkl.is_available():  # torch's x86 builds: MKL exports sgemm_/dgemm_
        assert some.build_info()["cpu_expert_gemm"] == "blas"
    T, d, N, h, k = 300, 32, 96, 48, 2
    x = torch.randn(T, d, dtype=dtype)
    idx, gates = random_routing(T, N, k, dtype, seed=4)
    idx[:40] = torch.arange(2)  # one busy pair of experts beside many with a row or two
    w1, b1, w2, b2 = make_experts(N, d, h, dtype, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, hidden, order, offsets = torch.ops.some.experts(x, idx, gates, w1, b1, w2, b2)
        for e in range(N):
            rows = order[offsets[e]:offsets[e + 1]]
            want = torch.mm(x[rows // k], w1[e].t()) + b1[e]
            assert torch.equal(hidden[offsets[e]:offsets[e + 1]], want), e
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("d,h", [(64, 128), (62, 130), (13, 17)])
def test_experts_bfloat16_error_no_worse_than_pytorch(d, h, device, backend):
    """bf16 with fp32 accumulation: the op's error against an fp64 reference is within a
    small factor of plain PyTorch's own bf16 error, for the forward and both gradients.
    (64, 128) takes the CUDA kernels' 16-byte loads, (62, 130) and (13, 17) their scalar
    loads (and the torch backend's loop where grouped_mm wants 16-byte aligned rows)."""
    T, N, k = 96, 8, 2
    x = torch.randn(T, d, dtype=torch.float64, device=device)
    idx, gates = random_routing(T, N, k, torch.float64, device, empty_frac=0)
    w = make_experts(N, d, h, device=device)
    wy = torch.randn(T, d, dtype=torch.float64, device=device)

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


def test_experts_gradcheck(device, backend):
    T, d, N, h, k = 6, 5, 3, 7, 2
    x = torch.randn(T, d, dtype=torch.float64, device=device, requires_grad=True)
    idx, gates = random_routing(T, N, k, torch.float64, device, seed=4)
    gates.requires_grad_()
    w = make_experts(N, d, h, device=device)
    assert torch.autograd.gradcheck(lambda x, g: ops.experts(x, idx, g, *w), (x, gates))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_opcheck(dtype, device):
    T, d, N, h, k = 10, 6, 4, 5, 2
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    idx, gates = random_routing(T, N, k, dtype, device)
    gates.requires_grad_()
    w = make_experts(N, d, h, dtype, device)
    torch.library.opcheck(torch.ops.some.experts.default, (x, idx, gates, *w))


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


@needs_cuda
@pytest.mark.parametrize("storage", ["materialized", "procedural"])
def test_experts_bf16_at_the_a4_shape_matches_an_fp32_loop(storage, backend):
    """One A4-sized problem (T = 8192 tokens of d = 512, N = 64 experts of h = 1024, k = 4) in
    bfloat16 (the sm_90 grouped-GEMM path) against the float32 loop over experts on the GPU.
    CUDA only: the CPU would take minutes."""
    dev = "cuda"
    T, d, h, N, k = 8192, 512, 1024, 64, 4
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, d, device=dev, generator=g)
    q = torch.randn(T, d, device=dev, generator=g)
    keys = F.normalize(torch.randn(N, d, device=dev, generator=g), dim=1)
    r = ops.route(q, keys, k, 0.8)
    spec = ops.ExpertSpec(0, 3, N, d, h, torch.bfloat16)
    w = [torch.empty(N, h, d, device=dev, dtype=torch.bfloat16), torch.empty(N, h, device=dev, dtype=torch.bfloat16),
         torch.empty(N, d, h, device=dev, dtype=torch.bfloat16), torch.empty(N, d, device=dev, dtype=torch.bfloat16)]
    ops.philox.fill_expert_weights(*w, spec.seed, spec.layer)
    xb = x.bfloat16().requires_grad_()
    gb = r.gates.detach().bfloat16().requires_grad_()
    if storage == "materialized":
        y = ops.experts(xb, r.indices, gb, *w)
    else:
        y = ops.procedural_experts(xb, r.indices, gb, spec)
    gy = torch.randn(T, d, device=dev, generator=g)
    y.float().backward(gy)
    xf = xb.detach().float().requires_grad_()
    gf = gb.detach().float().requires_grad_()
    ref = experts_loop_ref(xf, r.indices, gf, *[t.float() for t in w])
    ref.backward(gy)
    for got, want in ((y.float(), ref), (xb.grad.float(), xf.grad), (gb.grad.float(), gf.grad)):
        err = (got - want).norm() / want.norm()
        assert err < 2e-2, err  # bf16 inputs and outputs, fp32 accumulation


# ----------------------------------------------------------------- key store


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,d,N,k", [(40, 7, 6, 3), (1, 4, 1, 1), (500, 33, 9, 4), (70, 5, 40, 40)])
def test_keystore_stats_matches_reference(T, d, N, k, dtype, device, backend):
    q = torch.randn(T, d, dtype=torch.float64, device=device).to(dtype)
    idx, gates = random_routing(T, N, k, dtype, device)
    got = ops.keystore_stats(q, idx, gates, N)
    ref = keystore_stats_ref(q.cpu().double(), idx.cpu(), gates.cpu().double(), N)
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # sums of narrower queries in float32
    assert got.sum_q.dtype == acc and got.mass.dtype == acc
    assert got.counts.dtype == torch.long and got.coselect.dtype == torch.long
    tol_ = TOL[torch.float64] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for a, r, name in zip(got, ref, ("sum_q", "mass", "counts", "coselect")):
        assert a.device.type == device.type, name
        if a.is_floating_point():
            torch.testing.assert_close(a.cpu().double(), r, **tol_, msg=name)
        else:
            assert torch.equal(a.cpu(), r), name
    if device.type != "cpu":  # and the same op (same backend) on the CPU
        want = ops.keystore_stats(q.cpu(), idx.cpu(), gates.cpu(), N)
        for a, b, name in zip(got, want, ("sum_q", "mass", "counts", "coselect")):
            assert a.dtype == b.dtype, name
            if a.is_floating_point():
                torch.testing.assert_close(a.cpu(), b, **tol_, msg=name)
            else:
                assert torch.equal(a.cpu(), b), name


def test_keystore_stats_sum_over_batches(device, backend):
    q = torch.randn(30, 5, device=device)
    idx, gates = random_routing(30, 4, 2, torch.float32, device)
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
@pytest.mark.parametrize("N,d", [(8, 6), (45, 70)])  # 45 x 70: several tiles of the CUDA kernels
def test_keystore_update_matches_reference(rule, normalize, N, d, device, backend):
    K, V, u, q, idx, gates = keystore_case(N=N, d=d, device=device)
    stats = ops.keystore_stats(q, idx, gates, N)
    kw = dict(RULES[rule], theta_percentile=0.2)
    ref = keystore_update_ref(K.cpu(), V.cpu(), u.cpu(), *cpu(stats), normalize=normalize, **kw)
    K0 = K.clone()
    assert ops.keystore_update(K, V, u, *stats, normalize=normalize, **kw)
    assert not torch.equal(K, K0), "the update must move the keys"
    for got, want, name in zip((K, V, u), ref, ("keys", "velocity", "usage")):
        torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=1e-10, msg=name)


def test_keystore_update_float32_close_to_reference(device, backend):
    K, V, u, q, idx, gates = keystore_case(N=16, d=12, dtype=torch.float32, device=device)
    stats = ops.keystore_stats(q, idx, gates, 16)
    stats32 = [s.float() if s.is_floating_point() else s for s in stats]
    ref = keystore_update_ref(*cpu((K, V, u, *stats)), alpha=0.2, beta=0.1, delta=0.05, theta_percentile=0.05,
                              ema_decay=0.5)
    assert ops.keystore_update(K, V, u, *stats32, 0.2, 0.1, 0.05, 0.05, 0.5)
    for got, want in zip((K, V, u), ref):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)


def test_keystore_update_single_expert_and_no_tokens(device, backend):
    K, V, u, q, idx, gates = keystore_case(N=1, d=5, k=1, device=device)
    stats = ops.keystore_stats(q, idx, gates, 1)
    ref = keystore_update_ref(*cpu((K, V, u, *stats)), 0.1, 0.1, 0.1, 0.05, 0.5)
    assert ops.keystore_update(K, V, u, *stats, 0.1, 0.1, 0.1, 0.05, 0.5)
    torch.testing.assert_close(K.cpu(), ref[0])
    # a step where no token picked any expert: attraction/peer-pull are 0
    K, V, u, q, idx, gates = keystore_case(N=5, d=4, device=device)
    idx.fill_(-1)
    stats = ops.keystore_stats(q, idx, gates, 5)
    ref = keystore_update_ref(*cpu((K, V, u, *stats)), 0.1, 0.1, 0.1, 0.3, 0.5)
    assert ops.keystore_update(K, V, u, *stats, 0.1, 0.1, 0.1, 0.3, 0.5)
    for got, want in zip((K, V, u), ref):
        torch.testing.assert_close(got.cpu(), want)


def test_keystore_opcheck(device):
    K, V, u, q, idx, gates = keystore_case(dtype=torch.float32, device=device)
    q = q.float()
    torch.library.opcheck(torch.ops.some.keystore_stats.default, (q, idx, gates.float(), 8))
    stats = ops.keystore_stats(q, idx, gates, 8)
    torch.library.opcheck(torch.ops.some.keystore_update.default,
                          (K, V, u, *update_op_inputs(stats, K), 0.01, 0.005, 0.001, 0.05, 0.99, True))


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_bit_identical_across_runs(dtype, device, backend):
    torch.manual_seed(0)
    T, d, N, h, k = 700, 64, 16, 136, 4
    q = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    K = torch.randn(N, d, device=device)
    w = make_experts(N, d, h, dtype, device)

    def run():
        q.grad = x.grad = None
        r = ops.route(q, K.to(dtype), k, 0.8)
        y = ops.experts(x, r.indices, r.gates, *w)
        y.float().square().sum().backward()
        st = ops.keystore_stats(q, r.indices, r.gates, N)
        K2, V2, u2 = K.clone(), torch.zeros(N, d, device=device), torch.zeros(N, device=device)
        assert ops.keystore_update(K2, V2, u2, *st, 0.01, 0.005, 0.001, 0.05, 0.99)
        return [r.indices, r.gates, y, q.grad.clone(), x.grad.clone(), K2, V2, u2, *st]

    # The native kernels add without atomics on every device. PyTorch's index_add_ (the torch
    # backend's combine and sums) adds atomically on a GPU unless asked for its deterministic
    # algorithms, as a user of the torch backend who wants bit-identical runs there would.
    with repeatable(device, backend):
        a, b = run(), run()
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), i


# ------------------------------------------------------------ no host sync (CUDA)


@needs_cuda
def test_route_experts_stats_do_not_synchronize_on_cuda(monkeypatch):
    """The CUDA kernels of route, experts (forward and backward) and keystore_stats never
    wait for the device: the grouping, the tile schedule and every count stay on it.
    (The torch backend does: its loop over experts and its NaN check read values back.)"""
    monkeypatch.delenv("SOME_CHECK_INDICES", raising=False)  # that debug check syncs
    T, d, N, h, k = 257, 40, 12, 72, 3
    q = torch.randn(T, d, device="cuda", requires_grad=True)
    x = torch.randn(T, d, device="cuda", requires_grad=True)
    K = torch.randn(N, d, device="cuda")
    thr = torch.zeros(N, device="cuda", requires_grad=True)
    w = make_experts(N, d, h, torch.float32, "cuda")
    torch.cuda.synchronize()
    with ops.use_backend("native"):
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


@needs_cuda
def test_keystore_update_does_not_synchronize_on_cuda():
    """The CUDA kernel leaves its verdict in a 0-dim bool tensor on the device (the caller
    reads it when it synchronizes anyway) instead of returning a bool."""
    K, V, u, q, idx, gates = keystore_case(N=20, d=16, dtype=torch.float32, device="cuda")
    stats = ops.keystore_stats(q.float(), idx, gates.float(), 20)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        applied = torch.ops.some.keystore_update(K, V, u, *update_op_inputs(stats, K), 0.01, 0.005, 0.001, 0.05,
                                                 0.99, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(applied)


# --------------------------------------------------------------- bad input


def test_route_bad_inputs(device, backend):
    q, K, thr = make_route_inputs(4, 3, 5, torch.float32, device)
    with pytest.raises(ValueError, match="k must be in 1..N"):
        ops.route(q, K, 0, 0.8)
    with pytest.raises(ValueError, match="k must be in 1..N"):
        ops.route(q, K, 6, 0.8)
    with pytest.raises(ValueError, match="width d|dimension 1"):
        ops.route(q, torch.randn(5, 4, device=device), 2, 0.8)
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
    with pytest.raises(ValueError, match="top_p"):
        ops.route(q, K, 2, 0.8, "top_p", top_p=1.5)
    with pytest.raises(ValueError, match="same device"):
        ops.route(q, K.to(other_device(device)), 2, 0.8)
    with pytest.raises(ValueError, match="active"):
        ops.route(q, K, 2, 0.8, active=torch.ones(4, dtype=torch.bool, device=device))
    if backend == "native":  # the kernels check too
        with pytest.raises(ValueError, match="k must be in 1..N"):
            torch.ops.some.route(q, K, 6, 0.8)
        with pytest.raises(ValueError, match="thresholds"):
            torch.ops.some.route(q, K, 2, 0.8, "top_any")
        if device.type != "cpu":
            with pytest.raises(ValueError, match="same device"):
                torch.ops.some.route(q, K.cpu(), 2, 0.8)


def test_experts_bad_inputs(device, backend, monkeypatch):
    # the CUDA kernels read the indices only when asked (a host sync; see
    # test_experts_out_of_range_indices_on_cuda), the CPU kernels and the torch backend always
    monkeypatch.setenv("SOME_CHECK_INDICES", "1")
    T, d, N, h, k = 6, 4, 3, 5, 2
    x = torch.randn(T, d, device=device)
    idx, gates = random_routing(T, N, k, torch.float32, device, empty_frac=0)
    w1, b1, w2, b2 = make_experts(N, d, h, torch.float32, device)
    bad_idx = idx.clone()
    bad_idx[2, 1] = N
    with pytest.raises(IndexError, match=r"indices must be in -1\.\.N-1 = -1\.\.2, found 3 at flat position 5"):
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
        ops.experts(x, idx, gates, w1.to(other_device(device)), b1, w2, b2)
    if backend == "native" and device.type != "cpu":  # the kernel checks too
        with pytest.raises(ValueError, match="same device"):
            torch.ops.some.experts(x, idx, gates, w1.cpu(), b1, w2, b2)
    strided = w1.transpose(1, 2).contiguous().transpose(1, 2)
    if backend == "native":  # the kernels read the weights in place; the torch backend takes any strides
        with pytest.raises(ValueError, match="contiguous"):
            ops.experts(x, idx, gates, strided, b1, w2, b2)
    else:
        torch.testing.assert_close(ops.experts(x, idx, gates, strided, b1, w2, b2),
                                   ops.experts(x, idx, gates, w1, b1, w2, b2))
    with pytest.raises(ValueError, match="number of tokens"):
        ops.experts(x[:5], idx, gates, w1, b1, w2, b2)


@needs_cuda
def test_experts_out_of_range_indices_on_cuda(monkeypatch):
    """Without a sync the CUDA kernels cannot raise: such slots are dropped like -1 (and
    never dereferenced). SOME_CHECK_INDICES=1 restores the CPU's IndexError."""
    T, d, N, h, k = 6, 4, 3, 5, 2
    x = torch.randn(T, d, device="cuda")
    idx, gates = random_routing(T, N, k, torch.float32, "cuda", empty_frac=0)
    w = make_experts(N, d, h, torch.float32, "cuda")
    bad = idx.clone()
    bad[2, 1] = N
    bad[4, 0] = -2
    dropped = bad.clone()
    dropped[(bad < -1) | (bad >= N)] = -1
    monkeypatch.delenv("SOME_CHECK_INDICES", raising=False)
    with ops.use_backend("native"):
        torch.testing.assert_close(ops.experts(x, bad, gates, *w), ops.experts(x, dropped, gates, *w))
        # the kernel's sums, through the raw op: the wrapper adds the co-selection counts
        # (some.ops.coselect), which take the indices as they are and would scatter out of bounds
        st = torch.ops.some.keystore_stats(x, bad, gates, N)
        st_ref = torch.ops.some.keystore_stats(x, dropped, gates, N)
        for a, b in zip(st, st_ref):
            torch.testing.assert_close(a, b)
        monkeypatch.setenv("SOME_CHECK_INDICES", "1")
        with pytest.raises(IndexError, match=r"indices must be in -1\.\.N-1 = -1\.\.2, found 3 at flat position 5"):
            ops.experts(x, bad, gates, *w)
        with pytest.raises(IndexError, match="indices must be in"):
            ops.keystore_stats(x, bad, gates, N)


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


@needs_cuda
def test_keystore_nonfinite_query_propagates_on_cuda():
    """The CUDA kernel cannot raise on NaN without a sync (the CPU kernel and the torch
    backend do, above): NaN reaches the statistics, and keystore_update then refuses them."""
    K, V, u, q, idx, gates = keystore_case(device="cuda")
    t = int((idx >= 0).any(1).nonzero()[0])  # a token with a selected expert
    q[t, 1] = float("nan")
    with ops.use_backend("native"):
        stats = ops.keystore_stats(q, idx, gates, K.shape[0])
        assert not torch.isfinite(stats.sum_q).all()
        K0 = K.clone()
        with pytest.warns(RuntimeWarning, match="left untouched"):
            assert ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 0.05, 0.99) is False
    assert torch.equal(K, K0)


def test_keystore_update_nonfinite_stats_leave_store_untouched(device, backend):
    K, V, u, q, idx, gates = keystore_case(device=device)
    stats = list(ops.keystore_stats(q, idx, gates, K.shape[0]))
    stats[0][2, 2] = float("nan")
    K0, V0, u0 = K.clone(), V.clone(), u.clone()
    # without waiting: the verdict as a 0-dim bool tensor on the device (what the kernel writes)
    flag = ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 0.05, 0.99, wait=False)
    assert flag.device.type == device.type and flag.dtype == torch.bool and flag.dim() == 0 and not bool(flag)
    assert torch.equal(K, K0) and torch.equal(V, V0) and torch.equal(u, u0)
    with pytest.warns(RuntimeWarning, match="left untouched"):
        applied = ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 0.05, 0.99)
    assert applied is False
    assert torch.equal(K, K0) and torch.equal(V, V0) and torch.equal(u, u0)


def test_keystore_bad_inputs(device, backend):
    K, V, u, q, idx, gates = keystore_case(dtype=torch.float32, device=device)
    q = q.float()
    with pytest.raises(ValueError, match="num_experts"):
        ops.keystore_stats(q, idx, gates, 0)
    with pytest.raises(ValueError, match="same device"):
        ops.keystore_stats(q, idx.to(other_device(device)), gates, 8)
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
    with pytest.raises(ValueError, match="ema_decay"):
        ops.keystore_update(K, V, u, *stats, 0.01, 0.005, 0.001, 0.05, -0.1)
    if backend == "native":  # updated in place by the kernel; the torch backend takes any strides
        with pytest.raises(ValueError, match="contiguous"):
            Kt = torch.randn(K.shape[1], K.shape[0], device=device).T
            ops.keystore_update(Kt, V, u, *stats, *args)
    with pytest.raises(ValueError, match="same device"):
        ops.keystore_update(K, V, u, stats[0].to(other_device(device)), *stats[1:], *args)
    if backend == "native" and device.type != "cpu":  # the kernel checks too
        with pytest.raises(ValueError, match="same device"):
            torch.ops.some.keystore_update(K, V, u, stats[0].cpu(), *update_op_inputs(stats, K)[1:], *args, True)


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
