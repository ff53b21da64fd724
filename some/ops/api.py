"""The SoME ops of docs/method.md §5: typed wrappers with argument checks.

``route``, ``experts``, ``keystore_stats`` and ``keystore_update`` check their
arguments in Python (clear exceptions before dispatch; the kernels check
again) and call the backend that serves the tensors' device.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import torch_backend
from .backend import backend_for
from .checks import check_coselect
from .coselect import coselect_counts, peer_sums
from .types import GATINGS, SCORE_MODES, ExpertSpec, KeystoreStats, RouteResult

__all__ = ["experts", "keystore_stats", "keystore_update", "procedural_experts", "route"]


# --------------------------------------------------------------------------
# argument checks shared by the wrappers (the C++ kernels check again)
# --------------------------------------------------------------------------


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_devices(op: str, **tensors: Tensor | None) -> None:
    present = {n: t for n, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        raise ValueError(f"some.{op}: all tensors must be on the same device, got {where}")


# --------------------------------------------------------------------------
# route (docs/method.md §3 steps 1-4)
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
    thresholds: Tensor | None = None,
    active: Tensor | None = None,
    fallback_top1: bool = False,
    selection_bias: Tensor | None = None,
) -> RouteResult:
    """Score every token against the key store and pick its experts (docs/method.md §3 steps 1-4).

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
        selection_bias: ``(N,)`` finite per-expert bias added to the scores for
            choosing the top-k only (loss-free balancing, docs/method.md §4.1 ``balance_bias``);
            the slots come in the order of the biased scores, the gates, the returned
            scores and the gradients use the unbiased ones. Top-k gatings only (not
            ``top_p`` / ``top_any``). Never differentiated.

    Returns:
        ``RouteResult(indices, gates, scores)``, each ``(T, k)``; empty slots
        have index ``-1``, gate ``0`` and score ``0``. Differentiable w.r.t.
        ``query`` (and ``thresholds``), never w.r.t. ``keys``.
    """
    _check_tensor("query", query)
    _check_tensor("keys", keys)
    if selection_bias is not None:
        _check_tensor("selection_bias", selection_bias)
    if gating not in GATINGS:
        raise ValueError(f"some.route: unknown gating {gating!r}; expected one of {GATINGS}")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"some.route: unknown score_mode {score_mode!r}; expected one of {SCORE_MODES}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"some.route: k must be an int, got {type(k).__name__}")
    _check_devices("route", query=query, keys=keys, thresholds=thresholds, active=active,
                   selection_bias=selection_bias)
    if gating == "top_any" and thresholds is None:
        raise ValueError("some.route: gating 'top_any' needs the per-expert 'thresholds' tensor of shape (N,)")
    if backend_for(query.device) == "torch":
        return torch_backend.route(query, keys, k, float(temperature), gating, score_mode=score_mode,
                                   top_p=float(top_p), thresholds=thresholds, active=active,
                                   fallback_top1=fallback_top1, selection_bias=selection_bias)
    gates, scores, indices = torch.ops.some.route(
        query, keys, k, float(temperature), gating, score_mode, float(top_p), thresholds, active, fallback_top1,
        None if selection_bias is None else selection_bias.detach(),
    )
    return RouteResult(indices, gates, scores)


# --------------------------------------------------------------------------
# experts (docs/method.md §3 step 5)
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
    if backend_for(x.device) == "torch":
        return torch_backend.experts(x, indices, gates, w1, b1, w2, b2)
    return torch.ops.some.experts(x, indices, gates, w1, b1, w2, b2)[0]


def procedural_experts(x: Tensor, indices: Tensor, gates: Tensor, spec: ExpertSpec) -> Tensor:
    """:func:`experts` with procedural experts (docs/method.md §9): their weights are a
    function of ``spec`` (seed, layer, N, d, h, dtype), regenerated inside the
    kernels where they are used and never stored. The result is bit-identical
    to :func:`experts` with the stored experts that
    :func:`some.ops.philox.fill_expert_weights` makes from the same ``spec``.
    ``x`` and ``gates`` must have the experts' dtype ``spec.dtype``."""
    for name, t in (("x", x), ("indices", indices), ("gates", gates)):
        _check_tensor(name, t)
    if not isinstance(spec, ExpertSpec):
        raise TypeError(f"some.procedural_experts: spec must be an ExpertSpec, got {type(spec).__name__}")
    _check_devices("procedural_experts", x=x, indices=indices, gates=gates)
    if x.dim() == 2 and x.shape[1] != spec.d_model:
        raise ValueError(f"some.procedural_experts: x has width {x.shape[1]} but the experts take d = {spec.d_model}")
    if x.dtype != spec.dtype:
        raise TypeError(f"some.procedural_experts: x has dtype {x.dtype} but the experts are {spec.dtype}")
    args = (int(spec.seed), int(spec.layer), int(spec.num_experts), int(spec.d_ffn))
    if backend_for(x.device) == "torch":
        return torch_backend.procedural_experts(x, indices, gates, *args)
    return torch.ops.some.procedural_experts(x, indices, gates, *args)[0]


# --------------------------------------------------------------------------
# key store (docs/method.md §4)
# --------------------------------------------------------------------------


def keystore_stats(query: Tensor, indices: Tensor, gates: Tensor, num_experts: int, *,
                   sparse_coselect: bool = False) -> KeystoreStats:
    """The sums of docs/method.md §4 for one batch: ``(sum_q, mass, counts, coselect)``.

    ``sum_q`` uses the normalized queries. The result is a sum over tokens, so
    statistics of several micro-batches (or data-parallel ranks) add up.
    ``coselect`` is dense ``(N, N)``, or with ``sparse_coselect`` a sparse COO tensor
    holding only the pairs the batch selected (:mod:`some.ops.coselect`).
    Raises ``ValueError`` when ``query`` or ``gates`` hold NaN/Inf.
    """
    for name, t in (("query", query), ("indices", indices), ("gates", gates)):
        _check_tensor(name, t)
    _check_devices("keystore_stats", query=query, indices=indices, gates=gates)
    if backend_for(query.device) == "torch":
        sums = torch_backend.keystore_stats(query.detach(), indices, gates.detach(), int(num_experts))
    else:
        sums = torch.ops.some.keystore_stats(query.detach(), indices, gates.detach(), int(num_experts))
    # (the CPU op has checked the indices; CUDA skips out-of-range ones, and so does coselect_counts)
    return KeystoreStats(*sums, coselect_counts(indices, int(num_experts), sparse=sparse_coselect))


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
    *,
    wait: bool = True,
) -> bool | Tensor:
    """Apply one self-organization step (docs/method.md §4) to ``keys``, ``velocity`` and ``usage`` in place.

    Returns ``True`` when applied. Non-finite statistics, an already non-finite
    store, or an update that would overflow leave all three tensors untouched,
    warn, and return ``False``. With ``wait=False`` the verdict is returned as
    the 0-dim bool tensor the kernel wrote (no host synchronization on a GPU,
    no warning): the caller reads it when it synchronizes anyway.
    """
    for name, t in (("keys", keys), ("velocity", velocity), ("usage", usage), ("sum_q", sum_q),
                    ("mass", mass), ("counts", counts), ("coselect", coselect)):
        _check_tensor(name, t)
    _check_devices("keystore_update", keys=keys, velocity=velocity, usage=usage, sum_q=sum_q,
                   mass=mass, counts=counts, coselect=coselect)
    check_coselect("some.keystore_update", coselect, keys)
    args = (float(alpha), float(beta), float(delta), float(theta_percentile), float(ema_decay), bool(normalize))
    with torch.no_grad():
        peer = peer_sums(coselect, keys) if beta != 0 else \
            (torch.zeros_like(keys), torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device))
        if backend_for(keys.device) == "torch":
            ok = torch_backend.keystore_update(keys, velocity, usage, sum_q, mass, counts, *peer, *args)
        else:
            flag = torch.ops.some.keystore_update(keys, velocity, usage, sum_q, mass, counts, *peer, *args)
            if not wait:
                return flag
            ok = bool(flag)
    if not wait:
        return torch.tensor(ok, device=keys.device)
    if not ok:
        warnings.warn("some.keystore_update: non-finite key-store statistics; the key store was left untouched",
                      RuntimeWarning, stacklevel=2)
    return ok

