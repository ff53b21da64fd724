"""``some selftest``: check both backends of every op on this machine's device.

Every op and gating, forward and backward, at awkward sizes (and, on GPUs, one
A4-sized bfloat16 experts call: T = 24576, d = 512, h = 1024, N = 64, k = 4),
on the native kernels (where they are built for the device) and on the torch
backend, each against the float64 reference of :mod:`some.ops.reference`
computed from the same inputs. The error is the largest absolute difference
relative to the largest reference value; the tolerance depends on the dtype.
A table is printed; the process exits 1 on any mismatch.

    some selftest                      # the default device (CUDA if available)
    some selftest --device cpu --quick
    some selftest --device cuda --dtype bfloat16
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import api, native, verification
from .backend import use_backend
from .reference import experts_loop_ref, keystore_stats_ref, keystore_update_ref, route_ref
from .types import GATINGS

__all__ = ["CheckResult", "expert_problem", "record_verification", "run_selftest"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# error relative to the largest reference value, per dtype of the inputs
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2}
A4 = dict(T=24576, d=512, h=1024, N=64, k=4)


@dataclass
class CheckResult:
    op: str
    shape: str
    dtype: str
    backend: str
    error: float
    tolerance: float
    seconds: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-30)
    return float((got - want).abs().max()) / scale if want.numel() else 0.0


def _timed(fn: Callable[..., object], device: torch.device, *args) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def _backends(device: torch.device) -> list[str]:
    return (["native"] if native.built_for(device) else []) + ["torch"]


def _route_call(backend: str, query, keys, k, gating, thresholds, bias, weights):
    """Forward and backward of route on ``backend``; the loss weighs gates and scores."""
    with use_backend(backend):
        r = api.route(query, keys, k, 0.8, gating, thresholds=thresholds, selection_bias=bias)
        wg, ws = (w.to(device=query.device, dtype=r.gates.dtype) for w in weights)
        ((r.gates * wg).sum() + (r.scores * ws).sum()).backward()
    return r


def _route_checks(device, dtype, quick) -> Iterator[CheckResult]:
    shapes = [(1, 8, 4, 1), (37, 13, 9, 3)] + ([] if quick else [(257, 64, 64, 4)])
    for T, d, N, k in shapes:
        g = torch.Generator().manual_seed(T * 7 + N)
        q64 = torch.randn(T, d, generator=g, dtype=torch.float64)
        K64 = torch.randn(N, d, generator=g, dtype=torch.float64)
        thr64 = 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
        bias64 = 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
        q, K, thr = (t.to(device=device, dtype=dtype) for t in (q64, K64, thr64))
        bias = bias64.to(device=device, dtype=torch.float32)  # as the layer keeps it (float32)
        weights = tuple(torch.randn(T, k, generator=g, dtype=torch.float64) for _ in range(2))
        # every gating, and softmax choosing with a selection bias (balance_bias)
        for gating, b in [*((gating, None) for gating in GATINGS), ("softmax", bias)]:
            th = thr if gating == "top_any" else None
            qr = q.detach().double().cpu().clone().requires_grad_()  # a copy even for float64 inputs
            ref = route_ref(qr, K.double().cpu(), k, 0.8, gating, thresholds=None if th is None else th.double().cpu(),
                            selection_bias=None if b is None else b.double().cpu())
            ((ref[1] * weights[0]).sum() + (ref[2] * weights[1]).sum()).backward()
            for backend in _backends(device):
                qq = q.detach().clone().requires_grad_()
                r, seconds = _timed(_route_call, device, backend, qq, K, k, gating, th, b, weights)
                same = (r.indices.cpu() == ref[0]).all(dim=1)
                note = "" if bool(same.all()) else f"{int((~same).sum())}/{T} tokens chose other experts (near ties)"
                if dtype == torch.float64 and not bool(same.all()):
                    err = float("inf")
                elif bool(same.any()):
                    err = max(_rel_err(r.gates.cpu()[same], ref[1][same]), _rel_err(r.scores.cpu()[same], ref[2][same]))
                    if bool(same.all()):
                        err = max(err, _rel_err(qq.grad, qr.grad))
                else:
                    err = float("inf")
                if float((~same).float().mean()) > 0.02:  # a few near ties flip in low precision, not more
                    err = float("inf")
                name = f"route[{gating}]" if b is None else f"route[{gating}, selection_bias]"
                yield CheckResult(name, f"T={T} d={d} N={N} k={k}", str(dtype).removeprefix("torch."),
                                  backend, err, TOLERANCE[dtype], seconds, note)


def expert_problem(T: int, d: int, N: int, h: int, k: int, seed: int):
    """A seeded ``experts`` problem in float64 on the CPU: ``(x, indices, gates, [w1, b1, w2, b2],
    grad_y)``, about a tenth of the slots empty (also the GPU smoke script's inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w = [torch.randn(*s, generator=g, dtype=torch.float64) / s[-1] ** 0.5
         for s in ((N, h, d), (N, h), (N, d, h), (N, d))]
    idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(T)])
    idx[torch.rand(T, k, generator=g) < 0.1] = -1  # empty slots
    gates = torch.rand(T, k, generator=g, dtype=torch.float64) * (idx >= 0)
    gy = torch.randn(T, d, generator=g, dtype=torch.float64)
    return x, idx, gates, w, gy


def _expert_inputs(T, d, N, h, k, device, dtype, seed):
    x, idx, gates, w, gy = expert_problem(T, d, N, h, k, seed)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), idx.to(device), cast(gates), [cast(t) for t in w], cast(gy)


def _experts_call(backend: str, x, idx, gates, w, grad_y):
    with use_backend(backend):
        y = api.experts(x, idx, gates, *w)
        y.backward(grad_y)
    return y


def _experts_checks(device, dtype, quick, full) -> Iterator[CheckResult]:
    shapes = [dict(T=1, d=8, N=4, h=8, k=4), dict(T=37, d=13, N=6, h=17, k=3)]
    if not quick:
        shapes.append(dict(T=513, d=64, N=8, h=128, k=2))
    if dtype == torch.bfloat16 and not quick and (device.type != "cpu" or full):
        shapes.append(A4)
    for s in shapes:
        x, idx, gates, w, gy = _expert_inputs(s["T"], s["d"], s["N"], s["h"], s["k"], device, dtype, seed=s["T"])
        # the reference: float64 on the same device, from the same (rounded) inputs
        x64 = x.detach().double().clone().requires_grad_()
        g64 = gates.detach().double().clone().requires_grad_()
        y64 = experts_loop_ref(x64, idx, g64, *[t.double() for t in w])
        y64.backward(gy.double())
        for backend in _backends(device):
            xx, gg = x.detach().clone().requires_grad_(), gates.detach().clone().requires_grad_()
            y, seconds = _timed(_experts_call, device, backend, xx, idx, gg, w, gy)
            valid = idx >= 0
            err = max(_rel_err(y, y64), _rel_err(xx.grad, x64.grad), _rel_err(gg.grad * valid, g64.grad * valid))
            shape = " ".join(f"{k}={v}" for k, v in s.items())
            yield CheckResult("experts", shape, str(dtype).removeprefix("torch."), backend, err, TOLERANCE[dtype],
                              seconds)
        del x64, g64, y64


KEYSTORE_COEFFICIENTS = (0.2, 0.1, 0.05, 0.2, 0.5)  # alpha, beta, delta, theta_percentile, ema_decay


def _keystore_call(backend: str, inputs, store, N):
    with use_backend(backend):
        stats = api.keystore_stats(*inputs, N)
        K, V, u = (t.clone() for t in store)
        ok = api.keystore_update(K, V, u, *stats, *KEYSTORE_COEFFICIENTS)
    return stats, (K, V, u), ok


def _keystore_checks(device, dtype) -> Iterator[CheckResult]:
    if dtype == torch.bfloat16:  # the key store is kept in full precision
        return
    for T, d, N, k in ((50, 6, 1, 1), (500, 64, 64, 4)):
        g = torch.Generator().manual_seed(N)
        q = torch.randn(T, d, generator=g, dtype=torch.float64)
        idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(T)])
        gates = torch.rand(T, k, generator=g, dtype=torch.float64)
        K = torch.nn.functional.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=1)
        V = 0.01 * torch.randn(N, d, generator=g, dtype=torch.float64)
        u = torch.rand(N, generator=g, dtype=torch.float64)
        ref_stats = keystore_stats_ref(q, idx, gates, N)
        ref_update = keystore_update_ref(K, V, u, *ref_stats, *KEYSTORE_COEFFICIENTS)
        inputs = [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in (q, idx, gates)]
        store = [t.to(device=device, dtype=dtype) for t in (K, V, u)]
        for backend in _backends(device):
            (stats, updated, ok), seconds = _timed(_keystore_call, device, backend, inputs, store, N)
            err = max([_rel_err(a, b) for a, b in zip(stats, ref_stats, strict=True)]
                      + [_rel_err(a, b) for a, b in zip(updated, ref_update, strict=True)])
            if not ok:
                err = float("inf")
            yield CheckResult("keystore", f"T={T} d={d} N={N} k={k}", str(dtype).removeprefix("torch."), backend,
                              err, TOLERANCE[dtype], seconds)


def run_selftest(device: str | torch.device = "auto", dtypes: list[str] | None = None, *, quick: bool = False,
                 full: bool = False, echo: Callable[[str], None] = print) -> list[CheckResult]:
    """Run the checks and print the table; returns every result (``all(r.ok ...)`` is the verdict)."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"some selftest: {device!r} is not a device (auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"some selftest: no CUDA device {device} here (this torch {torch.__version__} sees "
                          f"{torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("some selftest: no MPS device here")
    names = dtypes or ["float64", "float32", "bfloat16"]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise ValueError(f"some selftest: unknown dtype {unknown}; expected some of {list(DTYPES)}")
    if device.type == "mps":  # no float64 on Apple GPUs
        names = [n for n in names if n != "float64"]
    echo(f"some selftest on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}), "
         f"torch {torch.__version__}, backends: {', '.join(_backends(device))}"
         + ("" if native.built_for(device) else f" (native kernels not available here: "
                                                 f"{native.IMPORT_ERROR or 'not built for ' + device.type})"))
    header = f"{'op':<17} {'shape':<34} {'dtype':<9} {'backend':<7} {'max error':>10} {'tolerance':>10}  ok  {'ms':>9}"
    echo(header)
    echo("-" * len(header))
    results = []
    for name in names:
        dtype = DTYPES[name]
        for r in (*_route_checks(device, dtype, quick), *_experts_checks(device, dtype, quick, full),
                  *_keystore_checks(device, dtype)):
            results.append(r)
            echo(f"{r.op:<17} {r.shape:<34} {r.dtype:<9} {r.backend:<7} {r.error:>10.2e} {r.tolerance:>10.0e}  "
                 f"{'ok' if r.ok else 'NO'}  {1e3 * r.seconds:>9.2f}" + (f"  {r.note}" if r.note else ""))
    failed = [r for r in results if not r.ok]
    echo(f"{len(results) - len(failed)} of {len(results)} checks passed" + (
        "" if not failed else ": FAILED " + ", ".join(f"{r.op} {r.dtype} {r.backend}" for r in failed)))
    if device.type == "cuda" and native.built_for(device):
        record_verification(device, results, quick, echo)
    return results


VERIFYING_DTYPES = {"float32", "bfloat16"}  # the dtypes training runs in: a verification covers both


def record_verification(device: torch.device, results: list[CheckResult], quick: bool,
                         echo: Callable[[str], None]) -> None:
    """Record (or withdraw) this build's verification on this GPU: ``auto`` serves the
    native CUDA kernels only where it is recorded (:mod:`some.ops.verification`)."""
    if any(not r.ok for r in results):
        verification.forget_verified(device)
        echo("the native CUDA kernels are not verified on this GPU: 'auto' serves the torch backend here")
        return
    covered = {r.dtype for r in results if r.backend == "native"}
    if quick or not VERIFYING_DTYPES <= covered:
        echo("not recorded as a verification: that takes float32 and bfloat16 checks without --quick")
        return
    path = verification.record_verified(device)
    echo(f"verified: 'auto' now serves the native CUDA kernels on this GPU with this build (recorded in {path})")
