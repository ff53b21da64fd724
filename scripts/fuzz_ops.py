"""Fuzz the SoME ops: seeded random calls through the wrappers and straight
through ``torch.ops.some.*``, valid and invalid, with awkward shapes, dtypes,
strides and special values.

    python scripts/fuzz_ops.py --calls 12000            # chunks in subprocesses: a crash is caught
    python scripts/fuzz_ops.py --calls 500 --seed 7 --in-process

Every call must end in one of:
  ok        a result; for valid calls with finite inputs the native result is
            compared with the torch backend's (an independent implementation):
            shapes, dtypes, indices and values must agree (else: "wrong");
  rejected  a ValueError / TypeError / IndexError (or the same raised as
            RuntimeError by a kernel's own allocation) naming the op;
and never in a crash (the chunk's process dies), a hang (the chunk times out)
or another exception type. The summary counts each outcome; the exit code is
1 when anything but ok / rejected happened.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import torch

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
GATINGS = ["softmax", "sigmoid", "relu", "avg_k", "top_p", "top_any"]
REJECTED = (ValueError, TypeError, IndexError)
LAST: dict = {}  # the last route call's inputs (for replaying a finding)


def special(rng: np.random.Generator, t: torch.Tensor) -> torch.Tensor:
    """Sometimes plant special values: NaN, ±Inf, huge, tiny, zeros, -0."""
    if t.numel() == 0 or not t.is_floating_point() or rng.random() > 0.25:
        return t
    t = t.clone()  # (clone keeps a strided layout; write through a flat copy)
    flat = t.reshape(-1).clone()
    which = rng.integers(0, 6)
    pos = rng.integers(0, flat.numel(), size=max(1, flat.numel() // 10))
    value = [math.nan, math.inf, -math.inf, 1e30, 1e-40, 0.0][which]
    flat[torch.as_tensor(pos)] = value
    return t.copy_(flat.view(t.shape)) if t.is_contiguous() else flat.view(t.shape).t().contiguous().t().copy_(
        flat.view(t.shape))


def strided(rng: np.random.Generator, t: torch.Tensor) -> torch.Tensor:
    """Sometimes a non-contiguous view with the same values."""
    if t.dim() == 2 and t.numel() and rng.random() < 0.2:
        return t.t().contiguous().t()
    return t


def rand_shape_route(rng):
    T = int(rng.choice([0, 1, 2, 5, 17, 64]))
    d = int(rng.choice([1, 3, 8, 13]))
    N = int(rng.choice([1, 2, 5, 9, 33]))
    return T, d, N


def call_route(rng, raw: bool):
    T, d, N = rand_shape_route(rng)
    dtype = DTYPES[rng.integers(0, 3)]
    q = special(rng, strided(rng, torch.randn(T, d).to(dtype)))
    K = special(rng, torch.randn(N, d).to(dtype))
    k = int(rng.choice([0, 1, 2, N, N + 1, -1])) if rng.random() < 0.15 else int(rng.integers(1, N + 1))
    gating = str(rng.choice(GATINGS)) if rng.random() > 0.03 else "bogus"
    tau = float(rng.choice([0.8, 0.1, 1e-39, 0.0, -1.0, math.nan, 5.0])) if rng.random() < 0.2 else 0.8
    thr = torch.randn(N if rng.random() > 0.05 else N + 1).to(dtype) if gating == "top_any" or rng.random() < 0.1 \
        else None
    active = (torch.rand(N if rng.random() > 0.05 else N + 2) > 0.3) if rng.random() < 0.2 else None
    if raw:
        return "route(raw)", lambda: torch.ops.some.route(q, K, k, tau, gating, "cosine", 0.4, thr, active, False), \
            None
    args = dict(thresholds=thr, active=active, fallback_top1=bool(rng.random() < 0.5))
    LAST.update(q=q, K=K, k=k, tau=tau, gating=gating, **args)
    valid = (1 <= k <= N and tau >= 1.2e-38 and math.isfinite(tau) and gating in GATINGS and T >= 0
             and (thr is None or thr.numel() == N) and (active is None or active.numel() == N)
             and (gating != "top_any" or thr is not None))
    finite = bool(torch.isfinite(q.float()).all() and torch.isfinite(K.float()).all())

    def run(backend):
        from some import ops

        with ops.use_backend(backend):
            qq = q.detach().clone().requires_grad_(T > 0)
            r = ops.route(qq, K, k, tau, gating, **args)
            if T > 0:
                (r.gates.float().sum() + r.scores.float().sum()).backward()
            return r, qq.grad

    return "route", lambda: run("native"), (lambda: run("torch")) if valid and finite and dtype != torch.bfloat16 \
        else None


def call_experts(rng, raw: bool):
    T = int(rng.choice([0, 1, 3, 16, 40]))
    d, h = int(rng.choice([1, 4, 7, 16])), int(rng.choice([1, 5, 8, 24]))
    N, k = int(rng.choice([1, 2, 6])), int(rng.choice([1, 2, 3]))
    dtype = DTYPES[rng.integers(0, 3)]
    x = special(rng, strided(rng, torch.randn(T, d).to(dtype)))
    idx = torch.randint(-1, N, (T, k))
    if rng.random() < 0.15 and idx.numel():  # out-of-range indices
        idx.view(-1)[int(rng.integers(0, idx.numel()))] = int(rng.choice([N, -2, 10**6, -(10**9)]))
    gates = special(rng, torch.rand(T, k).to(dtype))
    shapes = [(N, h, d), (N, h), (N, d, h), (N, d)]
    if rng.random() < 0.1:
        j = rng.integers(0, 4)
        shapes[j] = tuple(max(1, s + int(rng.choice([-1, 1]))) for s in shapes[j])
    w = [torch.randn(*s).to(dtype) / 3 for s in shapes]
    if rng.random() < 0.05:
        gates = gates.double()
    if raw:
        return "experts(raw)", lambda: torch.ops.some.experts(x, idx, gates, *w), None
    valid_idx = bool(((idx >= -1) & (idx < N)).all()) and all(tuple(t.shape) == s for t, s in
                                                              zip(w, [(N, h, d), (N, h), (N, d, h), (N, d)]))

    def run(backend):
        from some import ops

        with ops.use_backend(backend):
            xx = x.detach().clone().requires_grad_()
            gg = gates.detach().clone().requires_grad_()
            y = ops.experts(xx, idx, gg, *w)
            y.float().sum().backward()
            return y, xx.grad, gg.grad * (idx >= 0)

    finite = bool(torch.isfinite(x.float()).all() and torch.isfinite(gates.float()).all())
    compare = valid_idx and finite and gates.dtype == x.dtype and dtype != torch.bfloat16
    return "experts", lambda: run("native"), (lambda: run("torch")) if compare else None


def call_experts_backward_raw(rng):
    T, d, h, N, k = 12, 4, 6, 3, 2
    x = torch.randn(T, d)
    idx = torch.randint(-1, N, (T, k))
    gates = torch.rand(T, k)
    w1, b1, w2, b2 = torch.randn(N, h, d), torch.randn(N, h), torch.randn(N, d, h), torch.randn(N, d)
    _, hidden, order, offsets = torch.ops.some.experts(x, idx, gates, w1, b1, w2, b2)
    kind = rng.integers(0, 6)
    if kind == 0:
        order = order[torch.randperm(order.numel())]
    elif kind == 1:
        offsets = offsets.clone()
        offsets[rng.integers(0, N + 1)] = int(rng.choice([-5, 10**6, 7]))
    elif kind == 2:
        gates = torch.rand(1, 1)
    elif kind == 3:
        b2 = torch.randn(1)
    elif kind == 4:
        hidden = hidden[:-1]
    idx2 = idx if rng.random() > 0.2 else torch.randint(-1, N, (T, k))
    return "experts_backward(raw)", lambda: torch.ops.some.experts_backward(
        torch.randn(T, d), idx2, gates, w1, w2, b2, hidden, order, offsets, True, True), None


def call_route_backward_raw(rng):
    q, K = torch.randn(6, 5), torch.randn(4, 5)
    from some import ops

    gating = str(rng.choice(GATINGS))
    thr = torch.zeros(4) if gating == "top_any" else None
    idx, G, S = ops.route(q, K, 2, 0.8, gating, thresholds=thr)
    idx = idx.clone()
    if rng.random() < 0.7:
        idx.view(-1)[rng.integers(0, idx.numel())] = int(rng.choice([1 << 40, 4, 7, -2, -(1 << 50)]))
    if rng.random() < 0.2:
        idx = idx[:, :1]
    return "route_backward(raw)", lambda: torch.ops.some.route_backward(
        torch.ones_like(G), torch.ones_like(S), q, K, idx, G, S, 0.8, gating, "cosine", thr, None), None


def call_keystore(rng, raw: bool):
    N, d = int(rng.choice([1, 2, 5, 17])), int(rng.choice([1, 3, 8]))
    T, k = int(rng.choice([0, 1, 9, 30])), int(rng.choice([1, 2]))
    k = min(k, N)
    dtype = [torch.float32, torch.float64][rng.integers(0, 2)]
    q = special(rng, torch.randn(T, d).to(dtype))
    idx = torch.randint(-1, N, (T, k))
    if rng.random() < 0.1 and idx.numel():
        idx.view(-1)[0] = int(rng.choice([N, -3]))
    gates = special(rng, torch.rand(T, k).to(dtype))
    K = torch.nn.functional.normalize(torch.randn(N, d), dim=1).to(dtype)
    V, u = torch.zeros(N, d, dtype=dtype), torch.zeros(N, dtype=dtype)
    coef = [float(rng.choice([0.01, 0.3, 1e300, math.nan, 0.0])) if rng.random() < 0.15 else 0.05 for _ in range(3)]
    theta, gamma = float(rng.choice([0.05, 0.5, 1.5, -0.1])) if rng.random() < 0.1 else 0.05, 0.9
    alias = rng.random() < 0.05

    def run():
        from some import ops

        if raw:
            st = torch.ops.some.keystore_stats(q, idx, gates, N)
            return torch.ops.some.keystore_update(K, K if alias else V, u, *st, *coef, theta, gamma, True)
        st = ops.keystore_stats(q, idx, gates, N)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            K2 = K.clone()
            applied = ops.keystore_update(K2, K2 if alias else V.clone(), u.clone(), *st, *coef, theta, gamma)
        if applied:  # a store reported as updated must be finite
            assert bool(torch.isfinite(K2).all()), "keystore_update returned True with a non-finite store"
        return applied

    return ("keystore(raw)" if raw else "keystore"), run, None


def compare(a, b) -> bool:
    """Native vs torch backend results: same structure, dtypes, indices; values within tolerance."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(compare(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    if not isinstance(a, torch.Tensor):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    af, bf = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isnan(af), torch.isnan(bf)) or not torch.equal(torch.isinf(af), torch.isinf(bf)):
        return False  # NaN / Inf in one backend only
    finite = torch.isfinite(af)
    af, bf = af[finite], bf[finite]
    scale = max(float(bf.abs().max()) if bf.numel() else 0.0, 1.0)
    tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    return bool(((af - bf).abs() <= tol * scale).all())


def one_call(rng):
    kind = rng.integers(0, 9)
    raw = bool(rng.random() < 0.4)
    if kind <= 2:
        return call_route(rng, raw)
    if kind <= 4:
        return call_experts(rng, raw)
    if kind == 5:
        return call_experts_backward_raw(rng)
    if kind == 6:
        return call_route_backward_raw(rng)
    return call_keystore(rng, raw)


def run_chunk(seed: int, calls: int) -> dict:
    import some.ops  # noqa: F401  (loads the extension)

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # the tensors too: a chunk replays exactly
    outcomes, by_op, examples = Counter(), Counter(), []
    for i in range(calls):
        name, fn, reference = one_call(rng)
        by_op[name] += 1
        try:
            result = fn()
        except REJECTED:
            outcomes["rejected"] += 1
            continue
        except RuntimeError as e:  # a kernel's own clean error (allocation, a torch check)
            outcomes["rejected (RuntimeError)"] += 1
            if len(examples) < 5:
                examples.append(f"{name}: RuntimeError: {str(e).splitlines()[0][:200]}")
            continue
        except AssertionError as e:
            outcomes["wrong"] += 1
            examples.append(f"{name}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 -- any other exception type is a finding
            outcomes[f"other: {type(e).__name__}"] += 1
            examples.append(f"{name} (call {i}): {type(e).__name__}: {str(e)[:200]}")
            continue
        if reference is not None:
            if not compare(result, reference()):
                outcomes["wrong"] += 1
                examples.append(f"{name} (call {i}): native and torch backends disagree")
                continue
            outcomes["ok (compared)"] += 1
        else:
            outcomes["ok"] += 1
    return {"outcomes": dict(outcomes), "ops": dict(by_op), "examples": examples[:10]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=12000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1000, help="calls per subprocess")
    p.add_argument("--timeout", type=int, default=600, help="seconds a chunk may take (else: a hang)")
    p.add_argument("--in-process", action="store_true", help="one process, no crash isolation")
    p.add_argument("--_chunk", type=int, nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args._chunk:
        print(json.dumps(run_chunk(*args._chunk)))
        return 0
    if args.in_process:
        summary = run_chunk(args.seed, args.calls)
        print(json.dumps(summary, indent=1))
        return 0 if set(summary["outcomes"]) <= {"ok", "ok (compared)", "rejected", "rejected (RuntimeError)"} else 1
    t0 = time.perf_counter()
    total, ops_count, examples, crashes, hangs = Counter(), Counter(), [], [], []
    n_chunks = math.ceil(args.calls / args.chunk)
    for c in range(n_chunks):
        seed, calls = args.seed * 100_003 + c, min(args.chunk, args.calls - c * args.chunk)
        try:
            proc = subprocess.run([sys.executable, __file__, "--_chunk", str(seed), str(calls)], capture_output=True,
                                  text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            hangs.append(seed)
            continue
        if proc.returncode != 0:
            crashes.append((seed, proc.returncode, proc.stderr[-300:]))
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        total.update(res["outcomes"])
        ops_count.update(res["ops"])
        examples += res["examples"]
    seconds = time.perf_counter() - t0
    print(f"fuzz: {args.calls} calls in {n_chunks} processes ({seconds:.0f} s), seed {args.seed}")
    print("by op:    " + ", ".join(f"{k} {v}" for k, v in sorted(ops_count.items())))
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    print(f"crashes: {len(crashes)}, hangs: {len(hangs)}")
    for c in crashes:
        print(f"  crash in chunk seed {c[0]} (exit {c[1]}): {c[2]}")
    for e in examples[:10]:
        print(f"  e.g. {e}")
    bad = crashes or hangs or any(k not in ("ok", "ok (compared)", "rejected", "rejected (RuntimeError)")
                                  for k in total)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
