"""Benchmark of the SoME ops on both backends, with the ratios measured in one run.

    python benchmarks/bench_ops.py                      # T=4096 d=512 h=1024 N=64 k=4 fp32, CPU
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16 --T 24576
    python benchmarks/bench_ops.py --backend torch      # only the plain-PyTorch backend

Timed (median of --repeat runs after warm-up, all candidates interleaved so a
change of machine load affects every one alike):
  experts[B] fwd+bwd  some.ops.experts on backend B (native kernels / torch backend,
                      whose GEMMs are torch.nn.functional.grouped_mm), grads for x and gates
  dense matmuls       the same four GEMM shapes as one big dense expert: X W1ᵀ, A W2ᵀ
                      (forward) and G W2, D W1 (backward) - the same FLOPs, no routing
  naive loop          a plain-PyTorch loop over experts with autograd (weights frozen)
  route[B] fwd+bwd    some.ops.route, grads for the query
  keystore[B]         some.ops.keystore_stats + some.ops.keystore_update
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from some import ops
from some.ops.reference import experts_loop_ref as naive_loop


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fns, device, repeat, warmup=1):
    """Median time of each function; the runs are interleaved (a, b, c, a, b, c, ...)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def on(backend, fn):
    def run():
        with ops.use_backend(backend):
            fn()
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="both", choices=["both", "native", "torch"])
    p.add_argument("--storage", default="materialized", choices=["materialized", "procedural", "both"],
                   help="expert storage: stored tensors, or regenerated from the seed inside the op (method §9)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive loop")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = ["native", "torch"] if args.backend == "both" else [args.backend]
    T, d, h, N, k = args.T, args.d, args.h, args.N, args.k
    torch.manual_seed(0)
    x = torch.randn(T, d, device=device, dtype=dtype)
    q = torch.randn(T, d, device=device, dtype=dtype)
    keys = F.normalize(torch.randn(N, d, device=device), dim=1)
    w1 = torch.randn(N, h, d, device=device, dtype=dtype) / d**0.5
    b1 = torch.zeros(N, h, device=device, dtype=dtype)
    w2 = torch.randn(N, d, h, device=device, dtype=dtype) / h**0.5
    b2 = torch.zeros(N, d, device=device, dtype=dtype)
    with ops.use_backend(backends[0]):
        r = ops.route(q, keys, k, 0.8)
    indices, gates = r.indices, r.gates.detach()
    pairs = int((indices >= 0).sum())
    gy = torch.randn(T, d, device=device, dtype=dtype)

    spec = ops.ExpertSpec(0, 0, N, d, h, dtype)
    ops.philox.fill_expert_weights(w1, b1, w2, b2, spec.seed, spec.layer)  # the same experts both ways

    def experts_fb():
        xx = x.detach().requires_grad_()
        gg = gates.detach().requires_grad_()
        ops.experts(xx, indices, gg, w1, b1, w2, b2).backward(gy)

    def procedural_fb():
        xx = x.detach().requires_grad_()
        gg = gates.detach().requires_grad_()
        ops.procedural_experts(xx, indices, gg, spec).backward(gy)

    # The same four GEMMs on one dense expert of the same shapes.
    X = torch.randn(pairs, d, device=device, dtype=dtype)
    A = torch.randn(pairs, h, device=device, dtype=dtype)
    W1, W2 = w1[0], w2[0]

    def dense_fb():
        torch.mm(X, W1.T)
        torch.mm(A, W2.T)
        torch.mm(X, W2)
        torch.mm(A, W1)

    def naive_fb():
        xx = x.detach().requires_grad_()
        gg = gates.detach().requires_grad_()
        naive_loop(xx, indices, gg, w1, b1, w2, b2).backward(gy)

    wg = torch.randn(T, k, device=device, dtype=dtype)

    def route_fb():
        qq = q.detach().requires_grad_()
        (ops.route(qq, keys, k, 0.8).gates * wg).sum().backward()

    K, V, U = keys.clone(), torch.zeros_like(keys), torch.zeros(N, device=device)

    def keystore():
        st = ops.keystore_stats(q, indices, gates, N)
        ops.keystore_update(K, V, U, st.sum_q, st.mass, st.counts, st.coselect, 0.01, 0.005, 0.001, 0.05, 0.99)

    flops = 8 * pairs * d * h  # 4 GEMMs of 2·pairs·d·h
    storages = ["materialized", "procedural"] if args.storage == "both" else [args.storage]
    fns = {"dense": dense_fb}
    for b in backends:
        if "materialized" in storages:
            fns[f"experts[{b}]"] = on(b, experts_fb)
        if "procedural" in storages:
            fns[f"experts[{b}, procedural]"] = on(b, procedural_fb)
    for b in backends:
        fns[f"route[{b}]"] = on(b, route_fb)
        fns[f"keystore[{b}]"] = on(b, keystore)
    res = timeit(fns, device, args.repeat)
    if not args.skip_naive:  # slow: fewer runs, timed on its own
        res.update(timeit({"naive": naive_fb}, device, max(1, args.repeat // 2)))

    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    print(f"some {ops.build_info()['version']}, torch {torch.__version__}, device: {where}")
    print(f"shape: T={T} d={d} h={h} N={N} k={k} dtype={args.dtype}  ({pairs} token-expert pairs)")
    print(f"{'what':<28}{'time (ms)':>12}{'TFLOP/s':>10}")
    for name, t in res.items():
        tf = f"{flops / t / 1e12:10.3f}" if name.startswith(("experts", "dense", "naive")) else " " * 10
        label = name.replace("dense", "dense matmuls, same FLOPs").replace("naive", "naive loop fwd+bwd")
        print(f"{label:<28}{t * 1e3:12.2f}{tf}")
    ratios = {}
    for b in backends:
        if len(storages) == 2:
            ratios[f"{b}: procedural time / materialized time (experts)"] = \
                res[f"experts[{b}, procedural]"] / res[f"experts[{b}]"]
        e = res[f"experts[{b}]"] if "materialized" in storages else res[f"experts[{b}, procedural]"]
        ratios[f"{b}: experts throughput / dense matmul"] = res["dense"] / e
        if "naive" in res:
            ratios[f"{b}: speed-up over the naive loop"] = res["naive"] / e
        ratios[f"{b}: route time / experts time"] = res[f"route[{b}]"] / e
        ratios[f"{b}: keystore time / experts time"] = res[f"keystore[{b}]"] / e
    if len(backends) == 2 and "materialized" in storages:
        ratios["native speed-up over the torch backend (experts)"] = res["experts[torch]"] / res["experts[native]"]
    print("ratios:")
    for name, v in ratios.items():
        print(f"  {name:<52}{v:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "shape": vars(args), "seconds": res, "ratios": ratios,
                       "build": ops.build_info()}, f, indent=2)
    return ratios


if __name__ == "__main__":
    main()
