"""Benchmark of the SoME ops, with the ratios the issue asks for, measured in one run.

    python benchmarks/bench_ops.py                      # T=4096 d=512 h=1024 N=64 k=4 fp32, CPU
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16 --T 24576

Timed (median of --repeat runs after warm-up):
  experts fwd+bwd   some.ops.experts, grads for x and gates (experts frozen)
  dense matmuls     the same four GEMM shapes as one big dense expert: X W1ᵀ, A W2ᵀ
                    (forward) and G W2, D W1 (backward) - the same FLOPs, no routing
  naive loop        a plain-PyTorch loop over experts with autograd (weights frozen)
  grouped_mm        torch._grouped_mm over tokens sorted by expert (CUDA, when available)
  route fwd+bwd     some.ops.route, grads for the query
  keystore          some.ops.keystore_stats + some.ops.keystore_update
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import some
from some import ops

# The naive PyTorch loop over experts is the tests' reference (what a user writes without the op).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import experts_loop_ref as naive_loop  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fns, device, repeat, warmup=1):
    """Median time of each function; the runs are interleaved (a, b, c, a, b, c, ...)
    so that a change of machine load affects every candidate alike."""
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


def grouped_mm_experts(x, indices, gates, w1, b1, w2, b2):
    """torch._grouped_mm version: sort pairs by expert, two grouped GEMMs."""
    T, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs) + b1.repeat_interleave(counts, 0, output_size=flat.numel())
    out = torch._grouped_mm(F.gelu(h), w2.transpose(1, 2), offs=offs) + b2.repeat_interleave(counts, 0, output_size=flat.numel())
    out = out * gates.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, order // k, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive loop")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    T, d, h, N, k = args.T, args.d, args.h, args.N, args.k
    torch.manual_seed(0)
    x = torch.randn(T, d, device=device, dtype=dtype)
    q = torch.randn(T, d, device=device, dtype=dtype)
    keys = F.normalize(torch.randn(N, d, device=device), dim=1)
    w1 = torch.randn(N, h, d, device=device, dtype=dtype) / d**0.5
    b1 = torch.zeros(N, h, device=device, dtype=dtype)
    w2 = torch.randn(N, d, h, device=device, dtype=dtype) / h**0.5
    b2 = torch.zeros(N, d, device=device, dtype=dtype)
    r = ops.route(q, keys, k, 0.8)
    indices, gates = r.indices, r.gates.detach()
    pairs = int((indices >= 0).sum())
    gy = torch.randn(T, d, device=device, dtype=dtype)

    def experts_fb():
        xx = x.detach().requires_grad_()
        gg = gates.detach().requires_grad_()
        ops.experts(xx, indices, gg, w1, b1, w2, b2).backward(gy)

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

    def grouped_fb():
        xx = x.detach().requires_grad_()
        gg = gates.detach().requires_grad_()
        grouped_mm_experts(xx, indices, gg, w1, b1, w2, b2).backward(gy)

    wg = torch.randn(T, k, device=device, dtype=dtype)

    def route_fb():
        qq = q.detach().requires_grad_()
        (ops.route(qq, keys, k, 0.8).gates * wg).sum().backward()

    K, V, U = keys.clone(), torch.zeros_like(keys), torch.zeros(N, device=device)

    def keystore():
        st = ops.keystore_stats(q, indices, gates, N)
        ops.keystore_update(K, V, U, st.sum_q, st.mass, st.counts, st.coselect, 0.01, 0.005, 0.001, 0.05, 0.99)

    flops = 8 * pairs * d * h  # 4 GEMMs of 2·pairs·d·h
    fns = {"experts": experts_fb, "dense": dense_fb}
    if device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16:
        try:
            grouped_fb()
            fns["grouped_mm"] = grouped_fb
        except Exception as exc:  # not supported on this GPU/build
            print(f"torch._grouped_mm unavailable: {exc}")
    fns.update(route=route_fb, keystore=keystore)
    res = timeit(fns, device, args.repeat)
    if not args.skip_naive:  # slow: fewer runs, timed on its own
        res.update(timeit({"naive": naive_fb}, device, max(1, args.repeat // 2)))
    res = {name: res[name] for name in ("experts", "dense", "naive", "grouped_mm", "route", "keystore") if name in res}

    info = some.build_info()
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    print(f"some {info['version']}, torch {torch.__version__}, device: {where}")
    print(f"shape: T={T} d={d} h={h} N={N} k={k} dtype={args.dtype}  ({pairs} token-expert pairs)")
    print(f"{'what':<26}{'time (ms)':>12}{'TFLOP/s':>10}")
    labels = {"experts": "experts fwd+bwd", "dense": "dense matmuls, same FLOPs", "naive": "naive loop fwd+bwd",
              "grouped_mm": "torch._grouped_mm fwd+bwd", "route": "route fwd+bwd", "keystore": "keystore stats+update"}
    for name, t in res.items():
        tf = f"{flops / t / 1e12:10.3f}" if name in ("experts", "dense", "naive", "grouped_mm") else " " * 10
        print(f"{labels[name]:<26}{t * 1e3:12.2f}{tf}")
    ratios = {"experts_vs_dense_throughput": res["dense"] / res["experts"],
              "route_share_of_experts": res["route"] / res["experts"],
              "keystore_share_of_experts": res["keystore"] / res["experts"]}
    if "naive" in res:
        ratios["speedup_vs_naive_loop"] = res["naive"] / res["experts"]
    if "grouped_mm" in res:
        ratios["speedup_vs_grouped_mm"] = res["grouped_mm"] / res["experts"]
    print("ratios:")
    for name, v in ratios.items():
        print(f"  {name:<32}{v:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "shape": vars(args), "seconds": res, "ratios": ratios, "build": info}, f, indent=2)
    return ratios


if __name__ == "__main__":
    main()
