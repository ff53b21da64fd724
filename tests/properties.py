"""Property-based tests of the SoME ops (hypothesis). Run by tests/test_properties.py in a
subprocess, so that a crash of the process fails that test instead of killing the suite.

    python -m pytest -q tests/properties.py
"""
from __future__ import annotations

import math

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings

from some import ops

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
SPECIAL = st.sampled_from([0.0, 1e30, -1e30, 1e-40, math.nan, math.inf])


@st.composite
def tensors(draw, shape, dtype, specials=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))), dtype=torch.float64)
    if specials and t.numel() and draw(st.booleans()):
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, t.numel() - 1))] = draw(SPECIAL)
    t = t.to(dtype)
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t().contiguous().t()  # non-contiguous
    return t


@st.composite
def route_case(draw):
    T, d, N = draw(st.integers(0, 40)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = draw(DTYPES)
    return dict(query=draw(tensors((T, d), dtype)), keys=draw(tensors((N, d), dtype, specials=False)),
                k=draw(st.integers(1, N)), gating=draw(st.sampled_from(ops.GATINGS)),
                temperature=draw(st.sampled_from([0.05, 0.8, 3.0])), thresholds=draw(tensors((N,), dtype)),
                active=torch.tensor(draw(st.lists(st.booleans(), min_size=N, max_size=N))),
                score_mode=draw(st.sampled_from(["cosine", "dot"])), fallback_top1=draw(st.booleans()))


def _route(case, backend):
    with ops.use_backend(backend):
        c = dict(case)
        q, K, k, tau, gating = c.pop("query"), c.pop("keys"), c.pop("k"), c.pop("temperature"), c.pop("gating")
        if gating != "top_any":
            c["thresholds"] = None
        return ops.route(q, K, k, tau, gating, **c)


@SETTINGS
@given(route_case())
def test_route_outputs_are_well_formed(case):
    N, k = case["keys"].shape[0], case["k"]
    for backend in ("native", "torch"):
        r = _route(case, backend)
        assert r.indices.shape == (case["query"].shape[0], k) and r.indices.dtype == torch.long
        assert ((r.indices >= -1) & (r.indices < N)).all()
        for row, g in zip(r.indices.tolist(), r.gates.float().tolist()):
            chosen = [e for e in row if e >= 0]
            assert len(set(chosen)) == len(chosen)  # distinct experts
            assert row[len(chosen):] == [-1] * (k - len(chosen))  # empty slots last
            assert all(x == 0 for x in g[len(chosen):])  # empty slots carry gate 0
        assert not (r.indices >= 0).logical_and(~case["active"][r.indices.clamp_min(0)]).any()  # inactive never


@SETTINGS
@given(route_case())
def test_route_backends_agree_on_finite_inputs(case):
    if case["query"].dtype == torch.bfloat16 or not torch.isfinite(case["query"].double()).all():
        return
    q = case["query"]
    if q.numel() and (q.abs().max() > 1e20 or (q.abs().amax(1) < 1e-20).any()):
        return  # huge / all-tiny rows: each backend is exact to its own rounding; compared elsewhere
    a, b = _route(case, "native"), _route(case, "torch")
    assert torch.equal(a.indices, b.indices)
    tol = 1e-9 if case["query"].dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a.gates, b.gates, atol=tol, rtol=tol)
    torch.testing.assert_close(a.scores, b.scores, atol=tol, rtol=tol)


@st.composite
def experts_case(draw):
    T, d, h = draw(st.integers(0, 30)), draw(st.integers(1, 16)), draw(st.integers(1, 20))
    N, k = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    dtype = draw(DTYPES)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    idx = torch.randint(-1, N, (T, k), generator=g)
    return dict(x=draw(tensors((T, d), dtype, specials=False)), indices=idx,
                gates=torch.rand(T, k, generator=g).to(dtype),
                w=[torch.randn(*s, generator=g).to(dtype) / 3 for s in ((N, h, d), (N, h), (N, d, h), (N, d))])


@SETTINGS
@given(experts_case())
def test_experts_backends_agree(case):
    results = []
    for backend in ("native", "torch"):
        with ops.use_backend(backend):
            x = case["x"].detach().clone().requires_grad_()
            g = case["gates"].detach().clone().requires_grad_()
            y = ops.experts(x, case["indices"], g, *case["w"])
            y.float().sum().backward()
            results.append((y.float(), x.grad.float(), (g.grad * (case["indices"] >= 0)).float()))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 6e-2}[case["x"].dtype]
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        a, b = a.detach(), b.detach()
        scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
        assert float((a - b).abs().max() if a.numel() else 0.0) <= tol * scale


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 20), st.integers(-(2**62), 2**62),
       st.sampled_from(["route_backward", "experts", "experts_backward", "keystore_stats"]))
def test_raw_ops_reject_bad_indices_without_crashing(N, d, T, bad, op):
    """A raw dispatcher call with one planted index anywhere in int64 raises or
    returns; it never reads or writes outside a tensor (a crash fails the subprocess)."""
    q, K = torch.randn(max(T, 1), d), torch.randn(N, d)
    r = ops.route(q, K, 1, 0.8)
    idx = r.indices.clone()
    idx[0, 0] = bad
    valid = -1 <= bad < N
    w = [torch.randn(*s) for s in ((N, 3, d), (N, 3), (N, d, 3), (N, d))]
    try:
        if op == "route_backward":
            torch.ops.some.route_backward(torch.ones_like(r.gates), torch.ones_like(r.scores), q, K, idx, r.gates,
                                          r.scores, 0.8, "softmax", "cosine", None, None)
        elif op == "experts":
            torch.ops.some.experts(q, idx, r.gates, *w)
        elif op == "experts_backward":
            _, hidden, order, offsets = torch.ops.some.experts(q, r.indices, r.gates, *w)
            torch.ops.some.experts_backward(torch.ones_like(q), idx, r.gates, w[0], w[2], w[3], hidden, order,
                                            offsets, True, True)
        else:
            torch.ops.some.keystore_stats(q, idx, r.gates, N)
    except IndexError:
        assert not valid
    except ValueError:  # e.g. a grouping that no longer matches the planted index
        pass
    else:
        assert valid
