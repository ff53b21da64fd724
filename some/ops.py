"""Typed wrappers, fake kernels, autograd and FLOP formulas of the SoME ops.

The kernels are C++ (``csrc/cpu``) and CUDA (``csrc/cuda``) registered in the
PyTorch dispatcher as ``torch.ops.some.*``. This module is the Python face of
them:

* ``route``, ``experts``, ``keystore_stats``, ``keystore_update``: the API of
  SPEC §5, with argument checks that raise clear exceptions before dispatch;
* ``register_fake`` kernels stating the output shapes, so the ops trace under
  ``torch.compile`` and on the meta device;
* ``register_autograd`` for ``route`` (grad to query and top-any thresholds)
  and ``experts`` (grad to x and gates; the experts are frozen, so no weight
  gradient is ever computed), whose backwards call other registered ops;
* FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _C  # noqa: F401  (registers torch.ops.some.*)

__all__ = [
    "GATINGS",
    "SCORE_MODES",
    "RouteResult",
    "KeystoreStats",
    "route",
    "experts",
    "keystore_stats",
    "keystore_update",
]

GATINGS = ("softmax", "sigmoid", "relu", "avg_k", "top_p", "top_any")
SCORE_MODES = ("cosine", "dot")
_FLOATS = (torch.float32, torch.float64, torch.bfloat16)


class RouteResult(NamedTuple):
    indices: Tensor  # (T, k) int64, -1 for an empty slot
    gates: Tensor  # (T, k) query dtype, 0 for an empty slot
    scores: Tensor  # (T, k) query dtype


class KeystoreStats(NamedTuple):
    sum_q: Tensor  # (N, d) Σ g q̂ per expert (float32, float64 for float64 queries)
    mass: Tensor  # (N,) Σ g per expert
    counts: Tensor  # (N,) int64 selections per expert
    coselect: Tensor  # (N, N) int64 co-selection counts, zero diagonal

    def __add__(self, other: "KeystoreStats") -> "KeystoreStats":  # type: ignore[override]
        return KeystoreStats(*(a + b for a, b in zip(self, other)))


# --------------------------------------------------------------------------
# argument checks shared by the wrappers (the C++ kernels check again)
# --------------------------------------------------------------------------


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_devices(op: str, **tensors: Optional[Tensor]) -> None:
    present = {n: t for n, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        raise ValueError(f"some.{op}: all tensors must be on the same device, got {where}")


def _check_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"some.{op}: '{name}' must be float32, float64 or bfloat16, got {t.dtype}")


# --------------------------------------------------------------------------
# route (SPEC §3 steps 1-4)
# --------------------------------------------------------------------------


def route(
    query: Tensor,
    keys: Tensor,
    k: int,
    temperature: float,
    gating: str = "softmax",
    *,
    score_mode: str = "cosine",
    top_p: float = 0.4,
    thresholds: Optional[Tensor] = None,
    active: Optional[Tensor] = None,
    fallback_top1: bool = False,
) -> RouteResult:
    """Score every token against the key store and pick its experts.

    Args:
        query: ``(T, d)`` router outputs ``q_t``.
        keys: ``(N, d)`` key store ``K``.
        k: experts per token (``k_max`` for ``top_p`` and ``top_any``), in ``1..N``.
        temperature: ``τ > 0``.
        gating: one of ``softmax`` (default), ``sigmoid``, ``relu``, ``avg_k``,
            ``top_p``, ``top_any``.
        score_mode: ``cosine`` (default, ``q̂·k̂``) or ``dot`` (``q·K``).
        top_p: cumulative mass ``p`` for ``top_p`` gating.
        thresholds: ``(N,)`` trainable thresholds ``G_e`` for ``top_any``.
        active: ``(N,)`` bool mask; inactive experts are never selected.
        fallback_top1: for ``top_any``, a token that fires no expert gets its
            top-1 expert with gate 1 (used at evaluation).

    Returns:
        ``RouteResult(indices, gates, scores)``, each ``(T, k)``; empty slots
        have index ``-1``, gate ``0`` and score ``0``. Differentiable w.r.t.
        ``query`` (and ``thresholds``), never w.r.t. ``keys``.
    """
    _check_tensor("query", query)
    _check_tensor("keys", keys)
    if gating not in GATINGS:
        raise ValueError(f"some.route: unknown gating {gating!r}; expected one of {GATINGS}")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"some.route: unknown score_mode {score_mode!r}; expected one of {SCORE_MODES}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"some.route: k must be an int, got {type(k).__name__}")
    _check_devices("route", query=query, keys=keys, thresholds=thresholds, active=active)
    if gating == "top_any" and thresholds is None:
        raise ValueError("some.route: gating 'top_any' needs the per-expert 'thresholds' tensor of shape (N,)")
    gates, scores, indices = torch.ops.some.route(
        query, keys, k, float(temperature), gating, score_mode, float(top_p), thresholds, active, fallback_top1
    )
    return RouteResult(indices, gates, scores)


@torch.library.register_fake("some::route")
def _route_fake(query, keys, k, temperature, gating="softmax", score_mode="cosine", top_p=0.4,
                thresholds=None, active=None, fallback_top1=False):
    torch._check(query.dim() == 2, lambda: f"some.route: 'query' must be 2-D, got {tuple(query.shape)}")
    torch._check(keys.dim() == 2, lambda: f"some.route: 'keys' must be 2-D, got {tuple(keys.shape)}")
    torch._check(keys.shape[1] == query.shape[1], lambda: "some.route: keys and query widths differ")
    torch._check(query.device == keys.device, lambda: "some.route: query and keys on different devices")
    torch._check(1 <= k <= keys.shape[0], lambda: f"some.route: k must be in 1..N = 1..{keys.shape[0]}, got {k}")
    T = query.shape[0]
    return (query.new_empty((T, k)), query.new_empty((T, k)), query.new_empty((T, k), dtype=torch.long))


@torch.library.register_fake("some::route_backward")
def _route_backward_fake(grad_gates, grad_scores, query, keys, indices, gates, scores, temperature,
                         gating, score_mode, thresholds, active):
    grad_thr = thresholds.new_empty(thresholds.shape) if thresholds is not None else query.new_empty((0,))
    return torch.empty_like(query), grad_thr


def _route_setup_context(ctx, inputs, output):
    query, keys, k, temperature, gating, score_mode, top_p, thresholds, active, fallback_top1 = inputs
    gates, scores, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, keys, indices, gates, scores, thresholds, active)
    ctx.route_args = (temperature, gating, score_mode)


def _route_backward(ctx, grad_gates, grad_scores, grad_indices):
    query, keys, indices, gates, scores, thresholds, active = ctx.saved_tensors
    temperature, gating, score_mode = ctx.route_args
    need_query = ctx.needs_input_grad[0]
    need_thr = thresholds is not None and ctx.needs_input_grad[7]
    if not (need_query or need_thr) or (grad_gates is None and grad_scores is None):
        return (None,) * 10
    grad_gates = torch.zeros_like(gates) if grad_gates is None else grad_gates.contiguous()
    grad_scores = torch.zeros_like(scores) if grad_scores is None else grad_scores.contiguous()
    grad_query, grad_thr = torch.ops.some.route_backward(
        grad_gates, grad_scores, query, keys, indices, gates, scores,
        temperature, gating, score_mode, thresholds, active,
    )
    return (grad_query if need_query else None, None, None, None, None, None, None,
            grad_thr if need_thr else None, None, None)


torch.library.register_autograd("some::route", _route_backward, setup_context=_route_setup_context)


# --------------------------------------------------------------------------
# experts (SPEC §3 step 5)
# --------------------------------------------------------------------------


def experts(x: Tensor, indices: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``y_t = Σ_j g_tj · E_{I_tj}(x_t)`` with ``E_e(x) = W2_e GELU(W1_e x + b1_e) + b2_e``.

    Args:
        x: ``(T, d)`` inputs. indices: ``(T, k)`` int64 expert ids, ``-1`` skips a slot.
        gates: ``(T, k)``, same dtype as ``x``.
        w1: ``(N, h, d)``, b1: ``(N, h)``, w2: ``(N, d, h)``, b2: ``(N, d)``: frozen expert weights.

    Returns ``y`` of shape ``(T, d)``, differentiable w.r.t. ``x`` and ``gates``.
    The expert weights are frozen: passing one that requires grad is an error,
    since no gradient would reach it.
    """
    for name, t in (("x", x), ("indices", indices), ("gates", gates), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _check_tensor(name, t)
    _check_devices("experts", x=x, indices=indices, gates=gates, w1=w1, b1=b1, w2=w2, b2=b2)
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.requires_grad:
            raise ValueError(
                f"some.experts: the experts are frozen but '{name}' requires grad; "
                "no gradient is computed for expert weights (call .requires_grad_(False))"
            )
    return torch.ops.some.experts(x, indices, gates, w1, b1, w2, b2)[0]


@torch.library.register_fake("some::experts")
def _experts_fake(x, indices, gates, w1, b1, w2, b2):
    torch._check(x.dim() == 2 and indices.dim() == 2 and w1.dim() == 3,
                 lambda: "some.experts: expected x (T, d), indices (T, k), w1 (N, h, d)")
    torch._check(indices.shape[0] == x.shape[0], lambda: "some.experts: indices and x have different T")
    torch._check(gates.shape == indices.shape, lambda: "some.experts: gates and indices shapes differ")
    torch._check(w1.shape[2] == x.shape[1], lambda: "some.experts: w1 width differs from x")
    torch._check(indices.dtype == torch.long, lambda: "some.experts: indices must be int64")
    T, d = x.shape
    k = indices.shape[1]
    N, h = w1.shape[0], w1.shape[1]
    return (x.new_empty((T, d)), x.new_empty((T * k, h)), indices.new_empty((T * k,)), indices.new_empty((N + 1,)))


@torch.library.register_fake("some::experts_backward")
def _experts_backward_fake(grad_y, indices, gates, w1, w2, b2, hidden, order, offsets, need_grad_x, need_grad_gates):
    gx = grad_y.new_empty(grad_y.shape) if need_grad_x else grad_y.new_empty((0,))
    gg = gates.new_empty(gates.shape) if need_grad_gates else gates.new_empty((0,))
    return gx, gg


def _experts_setup_context(ctx, inputs, output):
    x, indices, gates, w1, b1, w2, b2 = inputs
    y, hidden, order, offsets = output
    ctx.mark_non_differentiable(hidden, order, offsets)
    # Without this, autograd would fill a (T·k, h) zero gradient for `hidden`
    # on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(indices, gates, w1, w2, b2, hidden, order, offsets)


def _experts_backward(ctx, grad_y, grad_hidden, grad_order, grad_offsets):
    indices, gates, w1, w2, b2, hidden, order, offsets = ctx.saved_tensors
    need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if grad_y is None or not (need_x or need_gates):
        return (None,) * 7
    grad_x, grad_gates = torch.ops.some.experts_backward(
        grad_y.contiguous(), indices, gates, w1, w2, b2, hidden, order, offsets, need_x, need_gates
    )
    return (grad_x if need_x else None, None, grad_gates if need_gates else None, None, None, None, None)


torch.library.register_autograd("some::experts", _experts_backward, setup_context=_experts_setup_context)


# --------------------------------------------------------------------------
# key store (SPEC §4)
# --------------------------------------------------------------------------


def keystore_stats(query: Tensor, indices: Tensor, gates: Tensor, num_experts: int) -> KeystoreStats:
    """The sums of SPEC §4 for one batch: ``(sum_q, mass, counts, coselect)``.

    ``sum_q`` uses the normalized queries. The result is a sum over tokens, so
    statistics of several micro-batches (or data-parallel ranks) add up.
    Raises ``ValueError`` when ``query`` or ``gates`` hold NaN/Inf.
    """
    for name, t in (("query", query), ("indices", indices), ("gates", gates)):
        _check_tensor(name, t)
    _check_devices("keystore_stats", query=query, indices=indices, gates=gates)
    out = torch.ops.some.keystore_stats(query.detach(), indices, gates.detach(), int(num_experts))
    return KeystoreStats(*out)


@torch.library.register_fake("some::keystore_stats")
def _keystore_stats_fake(query, indices, gates, num_experts):
    torch._check(num_experts >= 1, lambda: "some.keystore_stats: num_experts must be >= 1")
    N, d = num_experts, query.shape[1]
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (query.new_empty((N, d), dtype=acc), query.new_empty((N,), dtype=acc),
            indices.new_empty((N,)), indices.new_empty((N, N)))


def keystore_update(
    keys: Tensor,
    velocity: Tensor,
    usage: Tensor,
    sum_q: Tensor,
    mass: Tensor,
    counts: Tensor,
    coselect: Tensor,
    alpha: float,
    beta: float,
    delta: float,
    theta_percentile: float,
    ema_decay: float,
    normalize: bool = True,
) -> bool:
    """Apply one self-organization step (SPEC §4) to ``keys``, ``velocity`` and ``usage`` in place.

    Returns ``True`` when applied. Non-finite statistics (or an already
    non-finite store) leave all three tensors untouched, warn, and return ``False``.
    """
    for name, t in (("keys", keys), ("velocity", velocity), ("usage", usage), ("sum_q", sum_q),
                    ("mass", mass), ("counts", counts), ("coselect", coselect)):
        _check_tensor(name, t)
    _check_devices("keystore_update", keys=keys, velocity=velocity, usage=usage, sum_q=sum_q,
                   mass=mass, counts=counts, coselect=coselect)
    with torch.no_grad():
        applied = torch.ops.some.keystore_update(
            keys, velocity, usage, sum_q, mass, counts, coselect, float(alpha), float(beta),
            float(delta), float(theta_percentile), float(ema_decay), bool(normalize),
        )
    ok = bool(applied)
    if not ok:
        warnings.warn("some.keystore_update: non-finite key-store statistics; the key store was left untouched",
                      RuntimeWarning, stacklevel=2)
    return ok


@torch.library.register_fake("some::keystore_update")
def _keystore_update_fake(keys, velocity, usage, sum_q, mass, counts, coselect, alpha, beta, delta,
                          theta_percentile, ema_decay, normalize=True):
    return keys.new_empty((), dtype=torch.bool)


# --------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter.FlopCounterMode)
# --------------------------------------------------------------------------


def _valid_pairs(indices: Tensor) -> int:
    """Selected (token, slot) pairs; all T·k of them when the values are unknown (fake tensors)."""
    try:
        return int((indices >= 0).sum())
    except Exception:  # fake / meta tensors carry no values
        return indices.numel()


@register_flop_formula(torch.ops.some.route, get_raw=True)
def _route_flop(query, keys, *args, out_val=None, **kwargs) -> int:
    # the score GEMM q̂ K̂ᵀ
    return 2 * query.shape[0] * keys.shape[0] * query.shape[1]


@register_flop_formula(torch.ops.some.route_backward, get_raw=True)
def _route_backward_flop(grad_gates, grad_scores, query, keys, indices, *args, out_val=None, **kwargs) -> int:
    gating = args[3] if len(args) > 3 else kwargs.get("gating", "softmax")
    flops = 2 * indices.numel() * query.shape[1]
    if gating == "top_p":  # recomputed scores and the P-weighted key sum
        flops += 4 * query.shape[0] * keys.shape[0] * query.shape[1]
    return flops


@register_flop_formula(torch.ops.some.experts, get_raw=True)
def _experts_flop(x, indices, gates, w1, *args, out_val=None, **kwargs) -> int:
    # two GEMMs per selected pair: (1, d) x (d, h) and (1, h) x (h, d)
    return 4 * _valid_pairs(indices) * w1.shape[1] * w1.shape[2]


@register_flop_formula(torch.ops.some.experts_backward, get_raw=True)
def _experts_backward_flop(grad_y, indices, gates, w1, w2, b2, hidden, order, offsets, need_grad_x,
                           need_grad_gates, out_val=None, **kwargs) -> int:
    gemms = (1 if (need_grad_x or need_grad_gates) else 0) + (1 if need_grad_x else 0)
    return 2 * gemms * _valid_pairs(indices) * w1.shape[1] * w1.shape[2]
