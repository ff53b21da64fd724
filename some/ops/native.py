"""The native backend: the C++ (``csrc/cpu``) and CUDA (``csrc/cuda``) kernels
registered in the PyTorch dispatcher as ``torch.ops.some.*``.

Loading the compiled extension ``some._C`` registers the op schemas and the
kernels; this module adds what PyTorch needs around them:

* ``register_fake`` kernels stating the output shapes, so the ops trace under
  ``torch.compile`` and run on the meta device;
* ``register_autograd`` for ``route`` (grad to query and top-any thresholds)
  and ``experts`` (grad to x and gates; the experts are frozen, so no weight
  gradient is ever computed), whose backwards call other registered ops;
* FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode``.

Without the extension (a source checkout that was never built, a broken
build) :data:`AVAILABLE` is False and :data:`IMPORT_ERROR` says why.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import checks

__all__ = ["AVAILABLE", "IMPORT_ERROR", "build_info", "built_for", "extension_module"]

try:
    from .. import _C  # registers torch.ops.some.*
except (ImportError, OSError) as e:  # not built, or built against another torch
    _C = None
    IMPORT_ERROR: str | None = f"{type(e).__name__}: {e}"
else:
    IMPORT_ERROR = None
AVAILABLE = _C is not None


def build_info() -> dict:
    """How the extension was built: version, torch version, CUDA kernels,
    OpenMP threads; ``native`` is False (and ``reason`` says why) when the
    compiled extension is not loaded."""
    if _C is None:
        return {"native": False, "reason": IMPORT_ERROR, "version": None, "cuda": False, "openmp": False,
                "omp_max_threads": 1, "torch_version": torch.__version__}
    return {"native": True, **dict(_C.build_info())}


def extension_module():
    """The loaded compiled extension ``some._C`` (None when it is not loaded)."""
    return _C


def built_for(device: torch.device) -> bool:
    """Whether native kernels exist for tensors on ``device``."""
    if _C is None:
        return False
    if device.type in ("cpu", "meta"):
        return True
    return device.type == "cuda" and bool(_C.build_info()["cuda"])


# --------------------------------------------------------------------------
# fake kernels and autograd
# --------------------------------------------------------------------------


def _route_fake(query, keys, k, temperature, gating="softmax", score_mode="cosine", top_p=0.4,
                thresholds=None, active=None, fallback_top1=False, selection_bias=None):
    checks.check_route("some.route", query, keys, k, temperature, gating, score_mode, top_p, thresholds, active,
                       selection_bias)
    T = query.shape[0]
    return (query.new_empty((T, k)), query.new_empty((T, k)), query.new_empty((T, k), dtype=torch.long))


def _route_backward_fake(grad_gates, grad_scores, query, keys, indices, gates, scores, temperature,
                         gating, score_mode, thresholds, active):
    checks.check_route_backward("some.route_backward", grad_gates, grad_scores, query, keys, indices, gates, scores,
                                temperature, gating, score_mode, thresholds, active)
    grad_thr = thresholds.new_empty(thresholds.shape) if thresholds is not None else query.new_empty((0,))
    return torch.empty_like(query), grad_thr


def _no_double_backward(op: str, *grads) -> None:
    """The backward kernels are not differentiable: under create_graph=True say so instead
    of returning second derivatives that are silently None or zero."""
    if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):
        raise RuntimeError(f"{op}: double backward (create_graph=True, higher-order gradients) is not supported "
                           f"by the SoME ops")


def _route_setup_context(ctx, inputs, output):
    query, keys, k, temperature, gating, score_mode, top_p, thresholds, active, fallback_top1, _bias = inputs
    gates, scores, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, keys, indices, gates, scores, thresholds, active)
    ctx.route_args = (temperature, gating, score_mode)


def _route_backward(ctx, grad_gates, grad_scores, grad_indices):
    _no_double_backward("some.route", grad_gates, grad_scores)
    query, keys, indices, gates, scores, thresholds, active = ctx.saved_tensors
    temperature, gating, score_mode = ctx.route_args
    need_query = ctx.needs_input_grad[0]
    need_thr = thresholds is not None and ctx.needs_input_grad[7]
    if not (need_query or need_thr) or (grad_gates is None and grad_scores is None):
        return (None,) * 11
    grad_gates = torch.zeros_like(gates) if grad_gates is None else grad_gates.contiguous()
    grad_scores = torch.zeros_like(scores) if grad_scores is None else grad_scores.contiguous()
    grad_query, grad_thr = torch.ops.some.route_backward(
        grad_gates, grad_scores, query, keys, indices, gates, scores,
        temperature, gating, score_mode, thresholds, active,
    )
    return (grad_query if need_query else None, None, None, None, None, None, None,
            grad_thr if need_thr else None, None, None, None)


def _experts_fake(x, indices, gates, w1, b1, w2, b2):
    # the fake kernels check what the C++ kernels check, with the same exception
    # types, except the index values (a fake tensor has none)
    checks.check_experts("some.experts", x, indices, gates, w1, b1, w2, b2, values=False)
    T, d = x.shape
    k = indices.shape[1]
    N, h = w1.shape[0], w1.shape[1]
    return (x.new_empty((T, d)), x.new_empty((T * k, h)), indices.new_empty((T * k,)), indices.new_empty((N + 1,)))


def _experts_backward_fake(grad_y, indices, gates, w1, w2, b2, hidden, order, offsets, need_grad_x, need_grad_gates):
    checks.check_experts_backward("some.experts_backward", grad_y, indices, gates, w1, w2, b2, hidden, order, offsets)
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
    _no_double_backward("some.experts", grad_y)
    indices, gates, w1, w2, b2, hidden, order, offsets = ctx.saved_tensors
    need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if grad_y is None or not (need_x or need_gates):
        return (None,) * 7
    grad_x, grad_gates = torch.ops.some.experts_backward(
        grad_y.contiguous(), indices, gates, w1, w2, b2, hidden, order, offsets, need_x, need_gates
    )
    return (grad_x if need_x else None, None, grad_gates if need_gates else None, None, None, None, None)


def _procedural_experts_fake(x, indices, gates, seed, layer, num_experts, d_ffn):
    checks.check_procedural_experts("some.procedural_experts", x, indices, gates, seed, layer, num_experts, d_ffn,
                                    values=False)
    T, d = x.shape
    k = indices.shape[1]
    return (x.new_empty((T, d)), x.new_empty((T * k, d_ffn)), indices.new_empty((T * k,)),
            indices.new_empty((num_experts + 1,)))


def _procedural_experts_backward_fake(grad_y, indices, gates, seed, layer, num_experts, d_ffn, hidden, order, offsets,
                                      need_grad_x, need_grad_gates):
    op = "some.procedural_experts_backward"
    checks.check_procedural_experts(op, grad_y, indices, gates, seed, layer, num_experts, d_ffn, values=False)
    checks.check_grouping(op, hidden, order, offsets, indices.numel(), num_experts, d_ffn)
    gx = grad_y.new_empty(grad_y.shape) if need_grad_x else grad_y.new_empty((0,))
    gg = gates.new_empty(gates.shape) if need_grad_gates else gates.new_empty((0,))
    return gx, gg


def _procedural_setup_context(ctx, inputs, output):
    x, indices, gates, seed, layer, num_experts, d_ffn = inputs
    y, hidden, order, offsets = output
    ctx.mark_non_differentiable(hidden, order, offsets)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(indices, gates, hidden, order, offsets)
    ctx.generator = (seed, layer, num_experts, d_ffn)


def _procedural_backward(ctx, grad_y, grad_hidden, grad_order, grad_offsets):
    _no_double_backward("some.procedural_experts", grad_y)
    indices, gates, hidden, order, offsets = ctx.saved_tensors
    need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if grad_y is None or not (need_x or need_gates):
        return (None,) * 7
    grad_x, grad_gates = torch.ops.some.procedural_experts_backward(
        grad_y.contiguous(), indices, gates, *ctx.generator, hidden, order, offsets, need_x, need_gates)
    return (grad_x if need_x else None, None, grad_gates if need_gates else None, None, None, None, None)


def _fill_expert_weights_fake(w1, b1, w2, b2, seed, layer, first_expert):
    for name, t, dims in (("w1", w1, 3), ("b1", b1, 2), ("w2", w2, 3), ("b2", b2, 2)):
        if t.dim() != dims:
            raise ValueError(f"some.fill_expert_weights: '{name}' must be {dims}-D, got shape {list(t.shape)}")
    return None


def _keystore_stats_fake(query, indices, gates, num_experts):
    checks.check_keystore_stats("some.keystore_stats", query, indices, gates, num_experts, values=False)
    N, d = num_experts, query.shape[1]
    acc = checks.stats_dtype(query.dtype)
    return query.new_empty((N, d), dtype=acc), query.new_empty((N,), dtype=acc), indices.new_empty((N,))


def _keystore_update_fake(keys, velocity, usage, sum_q, mass, counts, peer_sum, peer_count, alpha, beta, delta,
                          theta_percentile, ema_decay, normalize=True):
    checks.check_keystore_update("some.keystore_update", keys, velocity, usage, sum_q, mass, counts, peer_sum,
                                 peer_count, alpha, beta, delta, theta_percentile, ema_decay)
    return keys.new_empty((), dtype=torch.bool)


# --------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter.FlopCounterMode)
# --------------------------------------------------------------------------


def valid_pairs(indices: torch.Tensor) -> int:
    """Selected (token, slot) pairs; all T·k of them when the values are unknown (fake tensors)."""
    try:
        return int((indices >= 0).sum())
    except Exception:  # fake / meta tensors carry no values
        return indices.numel()


def _route_flop(query, keys, *args, out_val=None, **kwargs) -> int:
    # the score GEMM q̂ K̂ᵀ
    return 2 * query.shape[0] * keys.shape[0] * query.shape[1]


def _route_backward_flop(grad_gates, grad_scores, query, keys, indices, *args, out_val=None, **kwargs) -> int:
    gating = args[3] if len(args) > 3 else kwargs.get("gating", "softmax")
    flops = 2 * indices.numel() * query.shape[1]
    if gating == "top_p":  # recomputed scores and the P-weighted key sum
        flops += 4 * query.shape[0] * keys.shape[0] * query.shape[1]
    return flops


def _experts_flop(x, indices, gates, w1, *args, out_val=None, **kwargs) -> int:
    # two GEMMs per selected pair: (1, d) x (d, h) and (1, h) x (h, d)
    return 4 * valid_pairs(indices) * w1.shape[1] * w1.shape[2]


def _experts_backward_flop(grad_y, indices, gates, w1, w2, b2, hidden, order, offsets, need_grad_x,
                           need_grad_gates, out_val=None, **kwargs) -> int:
    gemms = (1 if (need_grad_x or need_grad_gates) else 0) + (1 if need_grad_x else 0)
    return 2 * gemms * valid_pairs(indices) * w1.shape[1] * w1.shape[2]


def _procedural_experts_flop(x, indices, gates, seed, layer, num_experts, d_ffn, out_val=None, **kwargs) -> int:
    return 4 * valid_pairs(indices) * d_ffn * x.shape[1]  # as the stored experts (generation is not a GEMM)


def _procedural_experts_backward_flop(grad_y, indices, gates, seed, layer, num_experts, d_ffn, hidden, order,
                                      offsets, need_grad_x, need_grad_gates, out_val=None, **kwargs) -> int:
    gemms = (1 if (need_grad_x or need_grad_gates) else 0) + (1 if need_grad_x else 0)
    return 2 * gemms * valid_pairs(indices) * d_ffn * grad_y.shape[1]


def _register() -> None:
    fakes = {"route": _route_fake, "route_backward": _route_backward_fake, "experts": _experts_fake,
             "experts_backward": _experts_backward_fake, "procedural_experts": _procedural_experts_fake,
             "procedural_experts_backward": _procedural_experts_backward_fake,
             "fill_expert_weights": _fill_expert_weights_fake, "keystore_stats": _keystore_stats_fake,
             "keystore_update": _keystore_update_fake}
    for name, fn in fakes.items():
        torch.library.register_fake(f"some::{name}", fn)
    torch.library.register_autograd("some::route", _route_backward, setup_context=_route_setup_context)
    torch.library.register_autograd("some::experts", _experts_backward, setup_context=_experts_setup_context)
    torch.library.register_autograd("some::procedural_experts", _procedural_backward,
                                    setup_context=_procedural_setup_context)
    flops = {torch.ops.some.route: _route_flop, torch.ops.some.route_backward: _route_backward_flop,
             torch.ops.some.experts: _experts_flop, torch.ops.some.experts_backward: _experts_backward_flop,
             torch.ops.some.procedural_experts: _procedural_experts_flop,
             torch.ops.some.procedural_experts_backward: _procedural_experts_backward_flop}
    for op, fn in flops.items():
        register_flop_formula(op, get_raw=True)(fn)


if AVAILABLE:
    _register()
