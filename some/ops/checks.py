"""Argument checks of the SoME ops in Python, for the backends that are not C++.

They mirror ``csrc/op_checks.h`` (the checks of the native kernels): the same
conditions, the same exception types (``ValueError`` for shapes and values,
``TypeError`` for dtypes, ``IndexError`` for expert indices) and messages that
name the op and the argument, so a bad call reads the same on every backend.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .types import FLOAT_DTYPES, GATINGS, SCORE_MODES

__all__ = ["check_experts", "check_experts_backward", "check_grouping", "check_keystore_stats", "check_keystore_update",
           "check_procedural_experts", "check_route", "check_route_backward", "stats_dtype"]

_FLOAT_NAMES = "float32, float64 or bfloat16"
# The smallest positive normal float32: below it s/τ overflows in the kernels' precision
# (csrc/op_checks.h checks std::numeric_limits<float>::min(), the same number).
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a query dtype: float64 stays float64, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# dtype names as the C++ checks print them (c10::ScalarType), so both backends read alike
_SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
                 torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                 torch.uint8: "Byte", torch.bool: "Bool"}


def _name(dtype: torch.dtype) -> str:
    return _SCALAR_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _dim(op: str, name: str, t: Tensor, dim: int) -> None:
    if t.dim() != dim:
        raise ValueError(f"{op}: '{name}' must be {dim}-D, got shape {_shape(t)}")


def _size(op: str, name: str, t: Tensor, d: int, expected: int, what: str) -> None:
    if t.shape[d] != expected:
        raise ValueError(f"{op}: '{name}' has shape {_shape(t)} but dimension {d} must equal {what} = {expected}")


def _floating(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: '{name}' must be {_FLOAT_NAMES}, got {_name(t.dtype)}")


def _dtype(op: str, name: str, t: Tensor, expected: torch.dtype) -> None:
    if t.dtype != expected:
        raise TypeError(f"{op}: '{name}' must be {_name(expected)}, got {_name(t.dtype)}")


def _same_dtype(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: '{name}' has dtype {_name(t.dtype)} but '{ref_name}' has dtype {_name(ref.dtype)}; "
                        f"they must match")


def _same_device(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
                         f"all tensors must be on the same device")


def check_indices(op: str, indices: Tensor, num_experts: int) -> None:
    """Every index in ``-1..N-1`` (reads the values: a device sync on GPUs)."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        pos = int(torch.nonzero(indices.reshape(-1) == bad)[0])
        raise IndexError(f"{op}: indices must be in -1..N-1 = -1..{num_experts - 1}, found {bad} "
                         f"at flat position {pos}")


def check_route(op: str, query: Tensor, keys: Tensor, k: int, temperature: float, gating: str, score_mode: str,
                top_p: float, thresholds: Tensor | None, active: Tensor | None,
                selection_bias: Tensor | None = None) -> None:
    if gating not in GATINGS:
        raise ValueError(f"{op}: unknown gating '{gating}'; expected one of {', '.join(GATINGS)}")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"{op}: unknown score_mode '{score_mode}'; expected 'cosine' or 'dot'")
    _dim(op, "query", query, 2)
    _dim(op, "keys", keys, 2)
    _floating(op, "query", query)
    _floating(op, "keys", keys)
    _same_device(op, "keys", keys, "query", query)
    N = keys.shape[0]
    if N < 1:
        raise ValueError(f"{op}: 'keys' must hold at least one expert, got shape {_shape(keys)}")
    _size(op, "keys", keys, 1, query.shape[1], "the query width d")
    if not 1 <= k <= N:
        raise ValueError(f"{op}: k must be in 1..N = 1..{N}, got k = {k}")
    if not (isinstance(k, int) and not isinstance(k, bool)):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(f"{op}: temperature must be a finite number >= {MIN_TEMPERATURE:.6g} (the smallest normal "
                         f"float32), got {temperature}")
    if gating == "top_p" and not 0 < top_p <= 1:
        raise ValueError(f"{op}: top_p must be in (0, 1], got {top_p}")
    if gating == "top_any" and thresholds is None:
        raise ValueError(f"{op}: gating 'top_any' needs the per-expert 'thresholds' tensor of shape [N]")
    if thresholds is not None:
        _dim(op, "thresholds", thresholds, 1)
        _size(op, "thresholds", thresholds, 0, N, "the number of experts N")
        _floating(op, "thresholds", thresholds)
        _same_device(op, "thresholds", thresholds, "query", query)
    if active is not None:
        _dim(op, "active", active, 1)
        _size(op, "active", active, 0, N, "the number of experts N")
        _dtype(op, "active", active, torch.bool)
        _same_device(op, "active", active, "query", query)
    if selection_bias is not None:
        # the bias reorders a top-k; top_p and top_any select by the scores' own values
        if gating in ("top_p", "top_any"):
            raise ValueError(f"{op}: 'selection_bias' works with the top-k gatings (softmax, sigmoid, relu, avg_k), "
                             f"not with gating '{gating}'")
        _dim(op, "selection_bias", selection_bias, 1)
        _size(op, "selection_bias", selection_bias, 0, N, "the number of experts N")
        _floating(op, "selection_bias", selection_bias)
        _same_device(op, "selection_bias", selection_bias, "query", query)
        # a value check (a device sync on GPUs; fake tensors have no values): a NaN or Inf
        # bias would decide the selection alone
        if not is_fake(selection_bias) and not bool(torch.isfinite(selection_bias.to(stats_dtype(query.dtype))).all()):
            raise ValueError(f"{op}: 'selection_bias' must be finite (no NaN or Inf)")


def check_experts(op: str, x: Tensor, indices: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                  b2: Tensor, *, values: bool = True) -> None:
    _dim(op, "x", x, 2)
    _floating(op, "x", x)
    _dim(op, "indices", indices, 2)
    _dtype(op, "indices", indices, torch.long)
    _dim(op, "gates", gates, 2)
    _dim(op, "w1", w1, 3)
    _dim(op, "b1", b1, 2)
    _dim(op, "w2", w2, 3)
    _dim(op, "b2", b2, 2)
    T, d = x.shape
    N, h = w1.shape[0], w1.shape[1]
    _size(op, "indices", indices, 0, T, "the number of tokens T (rows of x)")
    if gates.shape != indices.shape:
        raise ValueError(f"{op}: 'gates' has shape {_shape(gates)} but 'indices' has shape {_shape(indices)}; "
                         f"both must be [T, k]")
    _size(op, "w1", w1, 2, d, "the model width d (columns of x)")
    _size(op, "b1", b1, 0, N, "the number of experts N (w1.shape[0])")
    _size(op, "b1", b1, 1, h, "the expert width h (w1.shape[1])")
    _size(op, "w2", w2, 0, N, "the number of experts N (w1.shape[0])")
    _size(op, "w2", w2, 1, d, "the model width d")
    _size(op, "w2", w2, 2, h, "the expert width h (w1.shape[1])")
    _size(op, "b2", b2, 0, N, "the number of experts N (w1.shape[0])")
    _size(op, "b2", b2, 1, d, "the model width d")
    for name, t in (("gates", gates), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _same_dtype(op, name, t, "x", x)
        _same_device(op, name, t, "x", x)
    _same_device(op, "indices", indices, "x", x)
    if values:
        check_indices(op, indices, N)


def check_procedural_experts(op: str, x: Tensor, indices: Tensor, gates: Tensor, seed: int, layer: int,
                             num_experts: int, d_ffn: int, *, values: bool = True) -> None:
    _dim(op, "x", x, 2)
    _floating(op, "x", x)
    _dim(op, "indices", indices, 2)
    _dtype(op, "indices", indices, torch.long)
    _size(op, "indices", indices, 0, x.shape[0], "the number of tokens T (rows of x)")
    if gates.shape != indices.shape:
        raise ValueError(f"{op}: 'gates' has shape {_shape(gates)} but 'indices' has shape {_shape(indices)}; "
                         f"both must be [T, k]")
    _same_dtype(op, "gates", gates, "x", x)
    _same_device(op, "gates", gates, "x", x)
    _same_device(op, "indices", indices, "x", x)
    for name, v in (("seed", seed), ("layer", layer)):
        if not 0 <= v <= 0xFFFFFFFF:
            raise ValueError(f"{op}: {name} must be in 0..2^32-1, got {v}")
    if not 1 <= num_experts < 2**31:
        raise ValueError(f"{op}: num_experts must be in 1..2^31-1, got {num_experts}")
    if not 1 <= d_ffn < 2**31:
        raise ValueError(f"{op}: d_ffn must be in 1..2^31-1, got {d_ffn}")
    if values:
        check_indices(op, indices, num_experts)


def check_keystore_stats(op: str, query: Tensor, indices: Tensor, gates: Tensor, num_experts: int, *,
                         values: bool = True) -> None:
    _dim(op, "query", query, 2)
    _floating(op, "query", query)
    _dim(op, "indices", indices, 2)
    _dtype(op, "indices", indices, torch.long)
    _size(op, "indices", indices, 0, query.shape[0], "the number of tokens T (rows of query)")
    if gates.shape != indices.shape:
        raise ValueError(f"{op}: 'gates' has shape {_shape(gates)} but 'indices' has shape {_shape(indices)}; "
                         f"both must be [T, k]")
    _floating(op, "gates", gates)
    _same_device(op, "indices", indices, "query", query)
    _same_device(op, "gates", gates, "query", query)
    if num_experts < 1:
        raise ValueError(f"{op}: num_experts must be >= 1, got {num_experts}")
    if values:
        check_indices(op, indices, num_experts)


def check_grouping(op: str, hidden: Tensor, order: Tensor, offsets: Tensor, P: int, N: int, h: int) -> None:
    """Shapes and dtypes of the grouping a forward returns (hidden [P, h], order [P], offsets [N + 1])."""
    if hidden.dim() != 2 or tuple(hidden.shape) != (P, h):
        raise ValueError(f"{op}: 'hidden' must have shape [T*k, h] = [{P}, {h}], got {_shape(hidden)}")
    if order.dim() != 1 or order.numel() != P or offsets.dim() != 1 or offsets.numel() != N + 1:
        raise ValueError(f"{op}: 'order'/'offsets' do not match this call (expected shapes [{P}] and [{N + 1}], got "
                         f"{_shape(order)} and {_shape(offsets)}); pass the tensors returned by the forward op")
    _dtype(op, "order", order, torch.long)
    _dtype(op, "offsets", offsets, torch.long)


def check_route_backward(op: str, grad_gates: Tensor, grad_scores: Tensor, query: Tensor, keys: Tensor,
                         indices: Tensor, gates: Tensor, scores: Tensor, temperature: float, gating: str,
                         score_mode: str, thresholds: Tensor | None, active: Tensor | None) -> None:
    _dim(op, "indices", indices, 2)
    _dtype(op, "indices", indices, torch.long)
    check_route(op, query, keys, indices.shape[1], temperature, gating, score_mode, 0.5, thresholds, active)
    _size(op, "indices", indices, 0, query.shape[0], "the number of tokens T (rows of query)")
    _same_device(op, "indices", indices, "query", query)
    for name, t in (("grad_gates", grad_gates), ("grad_scores", grad_scores), ("gates", gates), ("scores", scores)):
        if t.shape != indices.shape:
            raise ValueError(f"{op}: '{name}' must have shape [T, k] = {_shape(indices)}, got {_shape(t)}")
        _floating(op, name, t)
        _same_device(op, name, t, "query", query)


def check_experts_backward(op: str, grad_y: Tensor, indices: Tensor, gates: Tensor, w1: Tensor, w2: Tensor,
                           b2: Tensor, hidden: Tensor, order: Tensor, offsets: Tensor) -> None:
    _dim(op, "grad_y", grad_y, 2)
    _dim(op, "indices", indices, 2)
    _dim(op, "w1", w1, 3)
    _floating(op, "w1", w1)
    (T, k), (N, h, d) = indices.shape, w1.shape
    if tuple(grad_y.shape) != (T, d):
        raise ValueError(f"{op}: 'grad_y' must have shape [T, d] = [{T}, {d}], got {_shape(grad_y)}")
    if gates.shape != indices.shape:
        raise ValueError(f"{op}: 'gates' has shape {_shape(gates)} but 'indices' has shape {_shape(indices)}; "
                         f"both must be [T, k]")
    if w2.dim() != 3 or tuple(w2.shape) != (N, d, h):
        raise ValueError(f"{op}: 'w2' must have shape [N, d, h] = [{N}, {d}, {h}], got {_shape(w2)}")
    if b2.dim() != 2 or tuple(b2.shape) != (N, d):
        raise ValueError(f"{op}: 'b2' must have shape [N, d] = [{N}, {d}], got {_shape(b2)}")
    check_grouping(op, hidden, order, offsets, T * k, N, h)
    _dtype(op, "indices", indices, torch.long)
    for name, t in (("grad_y", grad_y), ("gates", gates), ("w2", w2), ("b2", b2), ("hidden", hidden)):
        _same_dtype(op, name, t, "w1", w1)
    for name, t in (("indices", indices), ("gates", gates), ("w1", w1), ("w2", w2), ("b2", b2),
                    ("hidden", hidden), ("order", order), ("offsets", offsets)):
        _same_device(op, name, t, "grad_y", grad_y)


def check_coselect(op: str, coselect: Tensor, keys: Tensor) -> None:
    """The co-selection counts ``(N, N)`` int64, dense or sparse COO, on the keys' device."""
    N = keys.shape[0] if keys.dim() >= 1 else 0
    if coselect.layout not in (torch.strided, torch.sparse_coo):
        raise ValueError(f"{op}: 'coselect' must be a dense or sparse COO tensor, got layout {coselect.layout}")
    if coselect.dim() != 2 or tuple(coselect.shape) != (N, N):
        raise ValueError(f"{op}: 'coselect' must have shape [N, N] = [{N}, {N}], got {_shape(coselect)}")
    _dtype(op, "coselect", coselect, torch.long)
    _same_device(op, "coselect", coselect, "keys", keys)


def check_keystore_update(op: str, keys: Tensor, velocity: Tensor, usage: Tensor, sum_q: Tensor, mass: Tensor,
                          counts: Tensor, peer_sum: Tensor, peer_count: Tensor, alpha: float, beta: float,
                          delta: float, theta_percentile: float, ema_decay: float) -> None:
    _dim(op, "keys", keys, 2)
    N = keys.shape[0]
    if keys.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: 'keys' must be float32 or float64 (the key store is kept in full precision), "
                        f"got {_name(keys.dtype)}")
    for name, t in (("velocity", velocity), ("sum_q", sum_q), ("peer_sum", peer_sum)):
        if t.shape != keys.shape:
            raise ValueError(f"{op}: '{name}' has shape {_shape(t)} but 'keys' has shape {_shape(keys)}")
    for name, t in (("usage", usage), ("mass", mass), ("counts", counts), ("peer_count", peer_count)):
        _dim(op, name, t, 1)
        _size(op, name, t, 0, N, "the number of experts N")
    for name, t in (("velocity", velocity), ("usage", usage), ("sum_q", sum_q), ("mass", mass),
                    ("peer_sum", peer_sum)):
        _same_dtype(op, name, t, "keys", keys)
    _dtype(op, "counts", counts, torch.long)
    _dtype(op, "peer_count", peer_count, torch.long)
    for name, t in (("velocity", velocity), ("usage", usage), ("sum_q", sum_q), ("mass", mass), ("counts", counts),
                    ("peer_sum", peer_sum), ("peer_count", peer_count)):
        _same_device(op, name, t, "keys", keys)
    if not is_fake(keys) and keys.device.type != "meta":  # (fake tensors have no storage to compare)
        storages = [t.untyped_storage().data_ptr() for t in (keys, velocity, usage)]
        if len(set(storages)) < 3 and all(t.numel() for t in (keys, velocity, usage)):
            raise ValueError(f"{op}: 'keys', 'velocity' and 'usage' are updated in place and must not share memory")
    for name, v in (("alpha", alpha), ("beta", beta), ("delta", delta)):
        if not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be finite, got {v}")
    if not 0 <= theta_percentile <= 1:
        raise ValueError(f"{op}: theta_percentile must be in [0, 1], got {theta_percentile}")
    if not 0 <= ema_decay <= 1:
        raise ValueError(f"{op}: ema_decay must be in [0, 1], got {ema_decay}")
