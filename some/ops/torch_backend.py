"""The ``torch`` backend: every SoME op written with PyTorch operators only.

It runs on any device PyTorch runs on (a GPU without a CUDA compiler at
install time, Apple and Intel GPUs, a CPU without the compiled extension),
and it is the peer the native kernels are measured and checked against.
Semantics are those of docs/method.md §3-§4 and of the native ops, to the rounding:

* route: scores by one matmul, the top-k by a *stable* descending sort (ties
  go to the lower index, docs/method.md §3 step 3), NaN scores and inactive experts never
  selected, gates by the gating formulas; autograd gives the gradients
  (to the query and the ``top_any`` thresholds, never to the keys);
* experts: the (token, slot) pairs grouped by expert with a stable argsort,
  both GEMMs of every expert in one ``torch.nn.functional.grouped_mm`` call
  (PyTorch's grouped GEMM; CUTLASS on SM90 bf16) or, where it refuses the
  dtype, device or alignment, a loop over the experts; the combine by
  ``index_add``. A custom autograd function computes only what is asked:
  the expert weights never get a gradient;
* key store: the same sums and update formulas, vectorized.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import philox
from .checks import (
    check_experts,
    check_keystore_stats,
    check_keystore_update,
    check_procedural_experts,
    check_route,
    stats_dtype,
)
from .types import RouteResult

__all__ = ["experts", "grouped_matmul", "keystore_stats", "keystore_update", "procedural_experts", "route"]

NORM_EPS = 1e-12  # as torch.nn.functional.normalize and the native kernels
REPULSION_EPS = 1e-8  # max(D, 1e-8) in the repulsion term (docs/method.md §4)


def _unit_rows(t: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm; the norm taken as max|x| * ||x / max|x||| so that
    it neither overflows nor underflows (as the native kernels take it)."""
    m = t.detach().abs().amax(dim=1, keepdim=True)  # a constant scale: ||x|| = m ||x / m|| exactly
    norm = (t / torch.where(m > 0, m, 1.0)).norm(dim=1, keepdim=True) * m
    return t / norm.clamp_min(NORM_EPS)


# --------------------------------------------------------------------------
# route
# --------------------------------------------------------------------------


def _top(scores: Tensor, eligible: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``k`` best eligible entries per row, descending, ties to
    the lower index (a stable sort), and which of the ``k`` slots hold one."""
    masked = scores.masked_fill(~eligible, -math.inf)
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    # then the eligible entries first, in that order: an eligible -inf score ties with the
    # masked ones and must still come before them (a stable sort keeps the score order)
    first = torch.sort(eligible.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True).indices
    order = order.gather(1, first)[:, :k]
    n_eligible = eligible.sum(dim=1, keepdim=True)
    valid = torch.arange(k, device=scores.device).unsqueeze(0) < n_eligible
    return order, valid


def route(query: Tensor, keys: Tensor, k: int, temperature: float, gating: str = "softmax", *,
          score_mode: str = "cosine", top_p: float = 0.4, thresholds: Tensor | None = None,
          active: Tensor | None = None, fallback_top1: bool = False,
          selection_bias: Tensor | None = None) -> RouteResult:
    op = "some.route"
    check_route(op, query, keys, k, temperature, gating, score_mode, top_p, thresholds, active, selection_bias)
    acc = stats_dtype(query.dtype)
    tau = float(temperature)
    q, K = query.to(acc), keys.detach().to(acc)
    if score_mode == "cosine":
        q, K = _unit_rows(q), _unit_rows(K)
    S = q @ K.T  # (T, N), differentiable w.r.t. the query only
    with torch.no_grad():
        eligible = ~torch.isnan(S)  # a NaN score is never a best match
        if active is not None:
            eligible &= active.unsqueeze(0)
        if gating == "top_any":
            thr = thresholds.detach().to(acc)
            fired = eligible & (S / tau > thr.unsqueeze(0))  # σ(s/τ) > σ(G_e)  <=>  s/τ > G_e
            idx, valid = _top(S, fired, k)
            fallback = ~valid[:, 0] & eligible.any(dim=1) if fallback_top1 else None
            if fallback is not None and bool(fallback.any()):
                best, best_valid = _top(S, eligible, 1)
                idx[:, :1] = torch.where(fallback.unsqueeze(1), best, idx[:, :1])
                valid[:, :1] |= fallback.unsqueeze(1) & best_valid
        elif selection_bias is not None:  # chosen by s + b; gated by s (below)
            idx, valid = _top(S + selection_bias.detach().to(acc).unsqueeze(0), eligible, k)
        else:
            idx, valid = _top(S, eligible, k)
    s_sel = S.gather(1, idx)  # (T, k), differentiable
    any_valid = valid.any(dim=1, keepdim=True)

    if gating == "softmax":
        z = torch.where(valid, s_sel / tau, -math.inf)
        gates = torch.softmax(torch.where(any_valid, z, 0.0), dim=1)  # rows with nothing selected stay finite
    elif gating == "sigmoid":
        gates = torch.sigmoid(s_sel / tau)
    elif gating == "relu":
        gates = torch.relu(s_sel)
    elif gating == "avg_k":  # EMoE's one-score gate: the layer sums its k experts
        gates = torch.ones_like(s_sel)
    elif gating == "top_p":
        # P = softmax(s/τ) over the eligible experts; keep the best ones up to
        # and including the first where the cumulative P exceeds p (strictly,
        # as the authors' code: an expert is kept while the sum before it is <= p).
        any_eligible = eligible.any(dim=1, keepdim=True)
        logits = torch.where(eligible & any_eligible, S / tau, torch.where(any_eligible, -math.inf, 0.0))
        P = torch.softmax(logits, dim=1).gather(1, idx)
        with torch.no_grad():
            running = torch.cumsum(torch.where(valid, P, 0.0), dim=1)  # in slot order, as the kernels add
            before = torch.cat([torch.zeros_like(running[:, :1]), running[:, :-1]], dim=1)
            valid = valid & (before <= top_p)
        gates = P
    else:  # top_any: straight-through mask m (1 forward, d(σ(s/τ) - σ(G)) backward), gates m / k(x)
        surrogate = torch.sigmoid(s_sel / tau) - torch.sigmoid(thresholds.to(acc)[idx])
        m = torch.where(valid, 1.0 + (surrogate - surrogate.detach()), 0.0)  # exactly 1 forward
        fired = valid.sum(dim=1, keepdim=True).clamp_min(1).to(acc)  # the fired count, a constant (as DynMoE)
        gates = m / fired
        if fallback is not None:
            gates = torch.where(fallback.unsqueeze(1), torch.ones_like(gates), gates)  # no gradient there
    gates = torch.where(valid, gates, 0.0)
    scores = torch.where(valid, s_sel, 0.0)
    indices = torch.where(valid, idx, -1)
    return RouteResult(indices, gates.to(query.dtype), scores.to(query.dtype))


# --------------------------------------------------------------------------
# experts
# --------------------------------------------------------------------------


def _grouped_mm_fits(a: Tensor, b: Tensor) -> bool:
    # PyTorch's grouped GEMM (F.grouped_mm, torch >= 2.10) takes float32/bfloat16/float16
    # with 16-byte aligned strides.
    if not hasattr(F, "grouped_mm"):
        return False
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return False
    size = a.element_size()
    return all((s * size) % 16 == 0 for s in (*a.stride()[:-1], *b.stride()[:-1]) if s != 1) \
        and all((s * size) % 16 == 0 for s in (a.shape[-1], b.shape[-1]))


def grouped_matmul(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """``out[rows of group e] = a[rows of group e] @ b[e]`` for ``a`` ``(P, K)``
    grouped by ``offsets`` (cumulative ends, int32) and ``b`` ``(N, K, M)``.
    ``torch.nn.functional.grouped_mm`` where it takes the inputs, else a loop
    over the groups (which reads the offsets on the host)."""
    if _grouped_mm_fits(a, b):
        try:
            return F.grouped_mm(a, b, offs=offsets)
        except (RuntimeError, NotImplementedError):  # a device or build without the kernel
            pass
    out = a.new_empty((a.shape[0], b.shape[2]))
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


class _StoredWeights:
    """The experts' four GEMMs over the grouped rows, from the stored (N, h, d) / (N, d, h) tensors."""

    def __init__(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor):
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2

    def up(self, rows: Tensor, offsets: Tensor) -> Tensor:  # rows @ W1_eᵀ
        return grouped_matmul(rows, self.w1.transpose(1, 2), offsets)

    def down(self, rows: Tensor, offsets: Tensor) -> Tensor:  # rows @ W2_eᵀ
        return grouped_matmul(rows, self.w2.transpose(1, 2), offsets)

    def down_grad(self, rows: Tensor, offsets: Tensor) -> Tensor:  # rows @ W2_e
        return grouped_matmul(rows, self.w2, offsets)

    def up_grad(self, rows: Tensor, offsets: Tensor) -> Tensor:  # rows @ W1_e
        return grouped_matmul(rows, self.w1, offsets)


class _GeneratedWeights:
    """The same GEMMs with procedural experts: each expert's matrix is generated
    (some.ops.philox) just before its rows are multiplied, one expert at a time."""

    def __init__(self, seed: int, layer: int, num_experts: int, d: int, h: int, dtype: torch.dtype,
                 device: torch.device):
        self.seed, self.layer, self.d, self.h, self.dtype, self.device = seed, layer, d, h, dtype, device
        # the biases of every expert: (N, h) and (N, d), small
        self.b1 = torch.stack([self._gen(e, philox.B1) for e in range(num_experts)])
        self.b2 = torch.stack([self._gen(e, philox.B2) for e in range(num_experts)])

    def _gen(self, expert: int, tensor: int) -> Tensor:
        d, h = self.d, self.h
        shape, fan_in = {philox.W1: ((h, d), d), philox.B1: ((h,), d), philox.W2: ((d, h), h),
                         philox.B2: ((d,), h)}[tensor]
        return philox.expert_tensor(self.seed, self.layer, expert, tensor, shape, fan_in, self.dtype, self.device)

    def _each(self, rows: Tensor, offsets: Tensor, tensor: int, transpose: bool) -> Tensor:
        cols = (self.h if tensor == philox.W1 else self.d) if transpose else (self.d if tensor == philox.W1 else self.h)
        out = rows.new_empty((rows.shape[0], cols))
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                w = self._gen(e, tensor)
                torch.mm(rows[start:end], w.T if transpose else w, out=out[start:end])
            start = end
        return out

    def up(self, rows, offsets):
        return self._each(rows, offsets, philox.W1, transpose=True)

    def down(self, rows, offsets):
        return self._each(rows, offsets, philox.W2, transpose=True)

    def down_grad(self, rows, offsets):
        return self._each(rows, offsets, philox.W2, transpose=False)

    def up_grad(self, rows, offsets):
        return self._each(rows, offsets, philox.W1, transpose=False)


class _Experts(torch.autograd.Function):
    """y = Σ_pairs g · E_e(x_t) over the grouped pairs; gradients for x and the gates only."""

    @staticmethod
    def forward(ctx, x, gates, tokens, pairs, experts_sorted, offsets, weights):
        T, d = x.shape
        opmath = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        pre = weights.up(x[tokens], offsets).add_(weights.b1[experts_sorted])  # (P, h)
        out = weights.down(F.gelu(pre), offsets).add_(weights.b2[experts_sorted])  # (P, d) = E_e(x_t)
        g = gates.reshape(-1)[pairs].to(opmath)  # (P,)
        y = torch.zeros(T, d, dtype=opmath, device=x.device).index_add_(0, tokens, out.to(opmath) * g[:, None])
        ctx.save_for_backward(tokens, pairs, offsets, pre, out, g)
        ctx.weights = weights  # frozen: never differentiated
        ctx.shapes = (gates.shape, x.dtype, gates.dtype)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        tokens, pairs, offsets, pre, out, g = ctx.saved_tensors
        gates_shape, x_dtype, gates_dtype = ctx.shapes
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gy = grad_y[tokens]  # (P, d)
        grad_x = grad_gates = None
        if need_gates:  # dL/dg = dL/dy_t · E_e(x_t): no GEMM
            pair_grad = (gy.to(g.dtype) * out.to(g.dtype)).sum(dim=1)
            grad_gates = torch.zeros(gates_shape.numel(), dtype=g.dtype, device=g.device)
            grad_gates = grad_gates.index_put_((pairs,), pair_grad).reshape(gates_shape).to(gates_dtype)
        if need_x:
            grad_act = ctx.weights.down_grad((gy.to(g.dtype) * g[:, None]).to(x_dtype), offsets)  # (P, h)
            grad_pre = torch.ops.aten.gelu_backward(grad_act, pre)  # exact GELU': Φ(x) + x φ(x), one kernel
            grad_rows = ctx.weights.up_grad(grad_pre, offsets)  # (P, d)
            grad_x = torch.zeros(grad_y.shape, dtype=g.dtype, device=grad_y.device)
            grad_x = grad_x.index_add_(0, tokens, grad_rows.to(g.dtype)).to(x_dtype)
        return grad_x, grad_gates, None, None, None, None, None


def _grouping(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The valid (token, slot) pairs grouped by expert (stable): pairs, their
    experts, cumulative group ends (int32) and tokens."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    pairs_all = torch.nonzero(flat >= 0).reshape(-1)  # (P,) valid pairs, in order
    by_expert = torch.sort(flat[pairs_all], stable=True)
    pairs = pairs_all[by_expert.indices]  # grouped by expert, in token order within each expert
    offsets = torch.cumsum(torch.bincount(by_expert.values, minlength=num_experts), dim=0).to(torch.int32)
    return pairs, by_expert.values, offsets, pairs // k


def experts(x: Tensor, indices: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    op = "some.experts"
    check_experts(op, x, indices, gates, w1, b1, w2, b2)
    pairs, experts_sorted, offsets, tokens = _grouping(indices, w1.shape[0])
    weights = _StoredWeights(w1.detach(), b1.detach(), w2.detach(), b2.detach())
    return _Experts.apply(x, gates, tokens, pairs, experts_sorted, offsets, weights)


def procedural_experts(x: Tensor, indices: Tensor, gates: Tensor, seed: int, layer: int, num_experts: int,
                       d_ffn: int) -> Tensor:
    op = "some.procedural_experts"
    check_procedural_experts(op, x, indices, gates, seed, layer, num_experts, d_ffn)
    pairs, experts_sorted, offsets, tokens = _grouping(indices, num_experts)
    weights = _GeneratedWeights(seed, layer, num_experts, x.shape[1], d_ffn, x.dtype, x.device)
    return _Experts.apply(x, gates, tokens, pairs, experts_sorted, offsets, weights)


# --------------------------------------------------------------------------
# key store
# --------------------------------------------------------------------------


def keystore_stats(query: Tensor, indices: Tensor, gates: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum_q, mass, counts)`` (the co-selection counts are some.ops.coselect's)."""
    op = "some.keystore_stats"
    check_keystore_stats(op, query, indices, gates, num_experts)
    if not bool(torch.isfinite(query).all()):
        raise ValueError(f"{op}: 'query' contains NaN or Inf; the key-store statistics would be corrupted, so "
                         f"nothing was computed (the keys are untouched)")
    if not bool(torch.isfinite(gates).all()):
        raise ValueError(f"{op}: 'gates' contains NaN or Inf; nothing was computed (the keys are untouched)")
    T, k = indices.shape
    N = num_experts
    acc = stats_dtype(query.dtype)
    q = _unit_rows(query.detach().to(acc))
    flat = indices.reshape(-1)
    pairs = torch.nonzero(flat >= 0).reshape(-1)
    e, tok = flat[pairs], pairs // k
    g = gates.detach().reshape(-1)[pairs].to(acc)
    mass = torch.zeros(N, dtype=acc, device=q.device).index_add_(0, e, g)
    sum_q = torch.zeros(N, q.shape[1], dtype=acc, device=q.device).index_add_(0, e, g[:, None] * q[tok])
    counts = torch.bincount(e, minlength=N)
    return sum_q, mass, counts


NEAR_FRACTION = 1e-2  # D² below this share of |K_e|² + |K_f|²: from the difference (csrc/cpu/repulsion.h)
DEFAULT_BLOCK_BYTES = 8 << 20
KEPT_MANTISSA_BITS = 7  # distance histogram resolution: 1/128 of an octave


def _block_bytes() -> int:
    try:
        value = int(os.environ.get("SOME_KEYSTORE_BLOCK_BYTES", ""))
    except ValueError:
        return DEFAULT_BLOCK_BYTES
    return value if value > 0 else DEFAULT_BLOCK_BYTES


class _Distances:
    """D on square tiles of the upper triangle (every pair computed once, so D is
    symmetric), from one product per tile, the pairs the product cannot resolve
    recomputed from their differences: the algorithm of ``csrc/cpu/repulsion.h``
    (tiles kept between passes when N² distances are small)."""

    def __init__(self, K: Tensor):
        self.K, self.N = K, K.shape[0]
        budget = _block_bytes()
        side = min(max(math.isqrt(max(budget // K.element_size(), 1)), 1), self.N)
        self.extent = lambda first: min(side, self.N - first)
        self.tiles = [(a, b) for a in range(0, self.N, side) for b in range(a, self.N, side)]
        self.sq = (K * K).sum(1)
        self.cache: dict[tuple[int, int], tuple[Tensor, Tensor]] | None = \
            {} if self.N * self.N * K.element_size() <= 8 * budget else None

    def pairs(self, tile: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The tile's distances ``(rows, cols)`` and the mask of its pairs e < f."""
        if self.cache is not None and tile in self.cache:
            return self.cache[tile]
        (r0, c0), K = tile, self.K
        nr, nc = self.extent(r0), self.extent(c0)
        e = torch.arange(r0, r0 + nr, device=K.device)[:, None]
        f = torch.arange(c0, c0 + nc, device=K.device)[None, :]
        upper = (f > e).expand(nr, nc)
        scale = self.sq[e] + self.sq[f]
        d2 = scale - 2 * (K[r0:r0 + nr] @ K[c0:c0 + nc].T)
        near = torch.nonzero((d2 < NEAR_FRACTION * scale) & upper)
        if near.numel():  # cancellation: from the difference instead
            d2[near[:, 0], near[:, 1]] = (K[r0 + near[:, 0]] - K[c0 + near[:, 1]]).pow(2).sum(1)
        out = (d2.clamp_min(0).sqrt(), upper)
        if self.cache is not None:
            self.cache[tile] = out
        return out


def _buckets(values: Tensor) -> Tensor:
    """Order-preserving buckets of non-negative floats: their leading bits."""
    if values.dtype == torch.float64:
        return values.view(torch.int64) >> (52 - KEPT_MANTISSA_BITS)
    return values.float().view(torch.int32).long() >> (23 - KEPT_MANTISSA_BITS)


def _theta(dist: _Distances, q: float) -> Tensor:
    """The q-quantile (linear interpolation, as ``torch.quantile``) of {D_ef : e < f},
    exact, in two passes: a histogram of buckets, then a sort of the two ranks' buckets."""
    N = dist.N
    M = N * (N - 1) // 2
    rank = q * (M - 1)
    lo = int(math.floor(rank))
    hi = min(lo + 1, M - 1)
    n_buckets = int(_buckets(torch.tensor(float("inf"), dtype=dist.K.dtype))) + 1
    hist = torch.zeros(n_buckets, dtype=torch.long, device=dist.K.device)
    for tile in dist.tiles:
        D, upper = dist.pairs(tile)
        hist += torch.bincount(_buckets(D[upper]), minlength=n_buckets)
    cum = hist.cumsum(0)
    first = int(torch.searchsorted(cum, lo, right=True))
    last = int(torch.searchsorted(cum, hi, right=True))
    below = int(cum[first - 1]) if first > 0 else 0
    kept = []
    for tile in dist.tiles:
        D, upper = dist.pairs(tile)
        v = D[upper]
        b = _buckets(v)
        kept.append(v[(b >= first) & (b <= last)])
    v = torch.sort(torch.cat(kept)).values
    return torch.lerp(v[lo - below], v[hi - below], torch.tensor(rank - lo, dtype=v.dtype, device=v.device))


def _push_sums(K: Tensor, theta_percentile: float) -> tuple[Tensor, Tensor]:
    """Σ_{f ≠ e, D_ef < θ} (K_e − K_f) / max(D_ef, 1e-8) per key, and how many such f:
    over the close pairs only, each from its exact difference (csrc/cpu/repulsion.h)."""
    dist = _Distances(K)
    theta = _theta(dist, theta_percentile)
    push = torch.zeros_like(K)
    close = torch.zeros(dist.N, dtype=torch.long, device=K.device)
    for tile in dist.tiles:
        (r0, c0) = tile
        D, upper = dist.pairs(tile)
        i, j = torch.nonzero((D < theta) & upper, as_tuple=True)
        e, f = r0 + i, c0 + j
        term = (K[e] - K[f]) / D[i, j].clamp_min(REPULSION_EPS)[:, None]
        push.index_add_(0, e, term).index_add_(0, f, -term)
        ones = torch.ones_like(e)
        close.index_add_(0, e, ones).index_add_(0, f, ones)
    return push, close


@torch.no_grad()
def keystore_update(keys: Tensor, velocity: Tensor, usage: Tensor, sum_q: Tensor, mass: Tensor, counts: Tensor,
                    peer_sum: Tensor, peer_count: Tensor, alpha: float, beta: float, delta: float,
                    theta_percentile: float, ema_decay: float, normalize: bool = True) -> bool:
    op = "some.keystore_update"
    check_keystore_update(op, keys, velocity, usage, sum_q, mass, counts, peer_sum, peer_count, alpha, beta, delta,
                          theta_percentile, ema_decay)
    finite = all(bool(torch.isfinite(t).all()) for t in (sum_q, mass, keys, velocity))
    if not finite:
        return False
    K = keys
    N = K.shape[0]
    step = torch.zeros_like(K)
    if alpha != 0:  # attraction to the gate-weighted mean query
        has = (mass > 0).unsqueeze(1)
        step += alpha * torch.where(has, sum_q / torch.where(has, mass.unsqueeze(1), 1.0) - K, 0.0)
    if beta != 0:  # peer-pull to the co-selection-weighted mean key
        row = peer_count.unsqueeze(1)
        step += beta * torch.where(row > 0, peer_sum / row.clamp_min(1).to(K.dtype) - K, 0.0)
    if delta != 0 and N > 1:  # push away from the keys closer than θ
        push, n_close = _push_sums(K, theta_percentile)
        n_close = n_close.unsqueeze(1)
        step += delta * torch.where(n_close > 0, push / n_close.clamp_min(1), 0.0)
    gamma = ema_decay
    new_v = gamma * velocity + (1 - gamma) * step
    new_k = K + new_v
    if normalize:
        new_k = _unit_rows(new_k)
    total = counts.sum()
    share = counts.to(usage.dtype) / total.clamp_min(1).to(usage.dtype)
    new_u = gamma * usage + (1 - gamma) * share
    if not all(bool(torch.isfinite(t).all()) for t in (new_k, new_v, new_u)):
        return False  # an update that would overflow leaves the store as it was
    keys.copy_(new_k)
    velocity.copy_(new_v)
    usage.copy_(new_u)
    return True
