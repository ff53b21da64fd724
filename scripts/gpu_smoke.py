"""A short smoke run of every op on the native kernels, for compute-sanitizer
(scripts/gpu_check.sh runs it under `--tool memcheck` and `--tool initcheck`).

route (forward and backward, every gating), experts and procedural_experts
(forward and backward), keystore_stats and keystore_update, in float32 and
bfloat16, at one small aligned shape and one awkward one (tails, widths that are
no multiple of 8), on the native backend (forced: no verification record needed).
Each result is compared with the float64 reference of some.ops.reference at a
loose tolerance, so a wrong kernel fails here too, not only a bad memory access;
the process exits 1 on any mismatch or non-finite value.

    python scripts/gpu_smoke.py --device cuda
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python scripts/gpu_smoke.py --device cuda
    python scripts/gpu_smoke.py --device cuda --gemm-check   # also: does SOME_CUDA_GEMM switch the bf16 GEMMs?

--gemm-check (CUDA only) runs one bfloat16 experts forward and backward with
SOME_CUDA_GEMM=grouped_mm, =kernels and unset, profiles which ATen ops ran and
requires aten::_grouped_mm with `grouped_mm` and none with `kernels` (so the
switch that scripts/gpu_check.sh relies on really changes the path), and the
three results to agree within bfloat16 rounding. (Without
PYTORCH_NO_CUDA_MEMORY_CACHING=1 PyTorch's caching allocator hands out pieces of
larger blocks, and memcheck cannot see an overrun into a neighbouring piece.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from some import ops
from some.ops.reference import experts_ref, keystore_stats_ref, keystore_update_ref, route_ref
from some.ops.selftest import expert_problem

# loose: this is a smoke test (the self-test and the test suite hold the real tolerances)
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
SHAPES = [dict(T=96, d=64, N=16, h=128, k=4), dict(T=37, d=13, N=6, h=17, k=3)]
COEFFICIENTS = (0.2, 0.1, 0.05, 0.2, 0.5)  # alpha, beta, delta, theta_percentile, ema_decay
failures: list[str] = []


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30) if want.numel() else 0.0


def check(what: str, err: float, tol: float) -> None:
    ok = err <= tol
    print(f"  {what:<44} {err:9.2e}  (tol {tol:.0e})  {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        failures.append(what)


def inputs(s: dict, seed: int):
    """Routing inputs (queries, unit keys, thresholds) and the self-test's experts problem."""
    g = torch.Generator().manual_seed(seed)
    T, d, N, h, k = s["T"], s["d"], s["N"], s["h"], s["k"]
    q = torch.randn(T, d, generator=g, dtype=torch.float64)
    keys = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=1)
    thr = 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    x, idx, gates, w, gy = expert_problem(T, d, N, h, k, seed + 1)
    return q, keys, thr, x, w, idx, gates, gy


def smoke(device: torch.device, dtype: torch.dtype, s: dict, seed: int) -> None:
    tol = TOL[dtype]
    shape = " ".join(f"{k}={v}" for k, v in s.items())
    print(f"{str(dtype).removeprefix('torch.')} {shape}", flush=True)
    q64, K64, thr64, x64, w64, idx, gates64, gy64 = inputs(s, seed)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    T, N, k = s["T"], s["N"], s["k"]

    # route, every gating: forward and backward
    for gating in ops.GATINGS:
        th = thr64 if gating == "top_any" else None
        qr = q64.clone().requires_grad_()
        ref = route_ref(qr, K64, k, 0.8, gating, thresholds=th)
        gw = torch.Generator().manual_seed(seed + 1)
        wg, ws = (torch.randn(T, k, generator=gw, dtype=torch.float64) for _ in range(2))
        ((ref[1] * wg).sum() + (ref[2] * ws).sum()).backward()  # gates and scores (avg_k's gates are constant)
        qq = to(q64).requires_grad_()
        r = ops.route(qq, to(K64), k, 0.8, gating, thresholds=None if th is None else to(th))
        gdt = r.gates.dtype
        ((r.gates * wg.to(device, gdt)).sum() + (r.scores * ws.to(device, gdt)).sum()).backward()
        same = (r.indices.cpu() == ref[0]).all(dim=1)  # near ties may flip in low precision
        sd = same.to(device)
        err = (max(rel_err(r.gates[sd], ref[1][same]), rel_err(r.scores[sd], ref[2][same])) if bool(same.any())
               else float("inf"))
        if bool(same.all()):
            err = max(err, rel_err(qq.grad, qr.grad))
        if float((~same).float().mean()) > 0.05:
            err = float("inf")
        check(f"route[{gating}] fwd+bwd", err, tol)

    # experts (stored) and procedural_experts: forward and backward
    x, gates, gy, idx_d = to(x64), to(gates64), to(gy64), idx.to(device)
    w = [to(t) for t in w64]
    xr, gr = x.double().cpu().requires_grad_(), gates.double().cpu().requires_grad_()
    y_ref = experts_ref(xr, idx, gr, *[t.double().cpu() for t in w])
    y_ref.backward(gy.double().cpu())
    xx, gg = x.clone().requires_grad_(), gates.clone().requires_grad_()
    y = ops.experts(xx, idx_d, gg, *w)
    y.backward(gy)
    valid = (idx >= 0).to(device)
    check("experts fwd+bwd", max(rel_err(y, y_ref), rel_err(xx.grad, xr.grad),
                                 rel_err(gg.grad * valid, gr.grad * valid.cpu())), tol)

    spec = ops.ExpertSpec(7, 3, N, s["d"], s["h"], dtype)
    wp = [torch.empty(t.shape, device=device, dtype=dtype) for t in w]
    ops.philox.fill_expert_weights(*wp, spec.seed, spec.layer)
    xr, gr = x.double().cpu().requires_grad_(), gates.double().cpu().requires_grad_()
    yp_ref = experts_ref(xr, idx, gr, *[t.double().cpu() for t in wp])
    yp_ref.backward(gy.double().cpu())
    xx, gg = x.clone().requires_grad_(), gates.clone().requires_grad_()
    yp = ops.procedural_experts(xx, idx_d, gg, spec)
    yp.backward(gy)
    check("procedural_experts fwd+bwd", max(rel_err(yp, yp_ref), rel_err(xx.grad, xr.grad),
                                            rel_err(gg.grad * valid, gr.grad * valid.cpu())), tol)

    # key store: statistics from the dtype's query, the update in float32 (the store is full precision)
    st = ops.keystore_stats(to(q64), idx_d, to(gates64), N)
    st_ref = keystore_stats_ref(to(q64).double().cpu(), idx, to(gates64).double().cpu(), N)
    check("keystore_stats", max(rel_err(a, b) for a, b in zip(st, st_ref)), tol)
    usage = torch.rand(N, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    store = [t.to(device=device, dtype=torch.float32) for t in (K64, 0.01 * K64.flip(0), usage)]
    stats32 = [t.to(torch.float32) if t.is_floating_point() else t for t in st]
    upd_ref = keystore_update_ref(*[t.double().cpu() for t in store], *[t.double().cpu() for t in stats32],
                                  *COEFFICIENTS)
    K, V, U = (t.clone() for t in store)
    ok = ops.keystore_update(K, V, U, *stats32, *COEFFICIENTS)
    err = max(rel_err(a, b) for a, b in zip((K, V, U), upd_ref)) if ok else float("inf")
    check("keystore_update", err, TOL[torch.float32] * (10 if dtype == torch.bfloat16 else 1))


def gemm_check(device: torch.device) -> None:
    """Whether SOME_CUDA_GEMM switches the stored-experts bfloat16 GEMMs between
    at::_grouped_mm and the hand-written kernels (seen in the profiler's ATen ops)."""
    from torch.profiler import ProfilerActivity, profile

    s = SHAPES[0]  # widths that are multiples of 8: the shape _grouped_mm takes
    _, _, _, x64, w64, idx, gates64, gy64 = inputs(s, 11)
    to = lambda t: t.to(device=device, dtype=torch.bfloat16)  # noqa: E731
    x, gates, gy, w, idx_d = to(x64), to(gates64), to(gy64), [to(t) for t in w64], idx.to(device)
    before = os.environ.get("SOME_CUDA_GEMM")
    results = {}
    print("gemm check: bfloat16 experts fwd+bwd under SOME_CUDA_GEMM=...", flush=True)
    try:
        for choice in ("grouped_mm", "kernels", "auto"):
            os.environ["SOME_CUDA_GEMM"] = choice  # read by csrc/cuda/experts.cu at every call
            xx, gg = x.clone().requires_grad_(), gates.clone().requires_grad_()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                y = ops.experts(xx, idx_d, gg, *w)
                y.backward(gy)
                torch.cuda.synchronize(device)
            seen = any(e.key == "aten::_grouped_mm" for e in prof.key_averages())
            results[choice] = (y.detach().float(), xx.grad.float())
            print(f"  SOME_CUDA_GEMM={choice:<10} aten::_grouped_mm ran: {seen}", flush=True)
            if choice == "grouped_mm" and not seen:
                failures.append("gemm check: SOME_CUDA_GEMM=grouped_mm did not run aten::_grouped_mm (no switch?)")
            if choice == "kernels" and seen:
                failures.append("gemm check: SOME_CUDA_GEMM=kernels still ran aten::_grouped_mm")
    finally:
        if before is None:
            os.environ.pop("SOME_CUDA_GEMM", None)
        else:
            os.environ["SOME_CUDA_GEMM"] = before
    for choice in ("kernels", "auto"):
        err = max(rel_err(a, b) for a, b in zip(results[choice], results["grouped_mm"]))
        check(f"gemm check: {choice} vs grouped_mm", err, TOL[torch.bfloat16])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--gemm-check", action="store_true", help="only the SOME_CUDA_GEMM check (CUDA)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if not ops.native.built_for(device):
        print(f"gpu_smoke: no native kernels for {device} in this build: {ops.build_info()}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    print(f"gpu_smoke on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}, "
          f"backend native (forced), SOME_CUDA_GEMM={os.environ.get('SOME_CUDA_GEMM', 'unset')}", flush=True)
    with ops.use_backend("native"):
        if args.gemm_check:
            if device.type != "cuda":
                print("gemm check: nothing to check off CUDA (the switch is a CUDA one)")
            else:
                gemm_check(device)
        else:
            for dtype in args.dtype:
                for i, s in enumerate(SHAPES):
                    smoke(device, getattr(torch, dtype), s, seed=10 * i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"gpu_smoke: {'FAILED: ' + '; '.join(failures) if failures else 'all ok'} ({time.perf_counter() - t0:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
