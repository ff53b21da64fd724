"""Plain-PyTorch references of the SoME ops, written from docs/method.md §3-§4.

They are deliberately naive (Python loops over tokens and experts, autograd
for the gradients) so that they read like the formulas: the tests and ``some
selftest`` compare both backends (the C++/CUDA kernels and the torch backend)
against them, usually in float64. Slow by design; not for training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["experts_loop_ref", "experts_ref", "keystore_stats_ref", "keystore_update_ref", "route_ref",
           "scores_ref"]


def scores_ref(query: Tensor, keys: Tensor, score_mode: str = "cosine") -> Tensor:
    if score_mode == "cosine":
        return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
    return query @ keys.T


def route_ref(query: Tensor, keys: Tensor, k: int, temperature: float, gating: str = "softmax",
              score_mode: str = "cosine", top_p: float = 0.4, thresholds: Tensor | None = None,
              active: Tensor | None = None, fallback_top1: bool = False, selection_bias: Tensor | None = None):
    """Steps 1-4 of docs/method.md §3, one token at a time (a ``selection_bias`` ranks by
    score + bias, DeepSeek-V3's loss-free balancing; the gates use the scores alone)."""
    if selection_bias is not None and gating in ("top_p", "top_any"):
        raise ValueError(f"route_ref: selection_bias is for the top-k gatings, not {gating!r}")
    S = scores_ref(query, keys, score_mode)  # (T, N)
    T, N = S.shape
    tau = temperature
    is_active = [True] * N if active is None else active.tolist()
    idx_rows, gate_rows, score_rows = [], [], []
    for t in range(T):
        s = S[t]
        vals = s.detach().tolist()
        if selection_bias is not None:
            vals = [v + b for v, b in zip(vals, selection_bias.tolist())]
        # descending score, ties to the lower index
        ranked = sorted((e for e in range(N) if is_active[e]), key=lambda e: (-vals[e], e))
        const_gate = None
        if gating == "top_any":
            fired = [e for e in ranked if vals[e] / tau > thresholds[e].item()]
            sel = fired[:k]
            if not sel and fallback_top1 and ranked:
                sel, const_gate = ranked[:1], True
        else:
            sel = ranked[:k]
        s_sel = s[sel]
        if gating == "softmax":
            g = torch.softmax(s_sel / tau, dim=0)
        elif gating == "sigmoid":
            g = torch.sigmoid(s_sel / tau)
        elif gating == "relu":
            g = torch.relu(s_sel)
        elif gating == "avg_k":
            g = torch.ones_like(s_sel)  # EMoE's one-score gate
        elif gating == "top_p":
            act_idx = [e for e in range(N) if is_active[e]]
            P_act = torch.softmax(s[act_idx] / tau, dim=0)
            P = {e: P_act[i] for i, e in enumerate(act_idx)}
            kept, cum = [], 0.0
            for e in sel:
                kept.append(e)
                cum += P[e].item()
                if cum > top_p:  # strictly, as the authors' code
                    break
            sel = kept
            s_sel = s[sel]
            g = torch.stack([P[e] for e in sel]) if sel else s_sel
        elif gating == "top_any":
            if const_gate:
                g = torch.ones_like(s_sel)
            elif sel:
                soft = torch.sigmoid(s_sel / tau) - torch.sigmoid(thresholds[sel])
                m = 1.0 + soft - soft.detach()  # straight-through: forward 1, backward d(soft)
                g = m / len(sel)  # divided by the fired count taken as a constant (as DynMoE)
            else:
                g = s_sel
        else:
            raise ValueError(gating)
        pad = k - len(sel)
        idx_rows.append(torch.tensor(sel + [-1] * pad, dtype=torch.long))
        gate_rows.append(torch.cat([g.to(query.dtype), query.new_zeros(pad)]))
        score_rows.append(torch.cat([s_sel.to(query.dtype), query.new_zeros(pad)]))
    return torch.stack(idx_rows), torch.stack(gate_rows), torch.stack(score_rows)


def experts_ref(x: Tensor, indices: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """y_t = Σ_j g_tj (W2_e GELU(W1_e x_t + b1_e) + b2_e), e = I_tj; -1 slots skipped."""
    valid = indices >= 0
    e = indices.clamp_min(0)
    pre = torch.einsum("tkhd,td->tkh", w1[e], x) + b1[e]
    out = torch.einsum("tkdh,tkh->tkd", w2[e], F.gelu(pre)) + b2[e]
    return (out * (gates * valid)[..., None]).sum(1)


def experts_loop_ref(x, indices, gates, w1, b1, w2, b2) -> Tensor:
    """The naive PyTorch loop over experts (what a user would write)."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(indices == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = F.gelu(x[tok] @ w1[e].T + b1[e])
        y = y.index_add(0, tok, (h @ w2[e].T + b2[e]) * gates[tok, slot, None])
    return y


def keystore_stats_ref(query: Tensor, indices: Tensor, gates: Tensor, N: int):
    q = F.normalize(query.double(), dim=-1)
    T, k = indices.shape
    sum_q = torch.zeros(N, q.shape[1], dtype=torch.float64)
    mass = torch.zeros(N, dtype=torch.float64)
    counts = torch.zeros(N, dtype=torch.long)
    cosel = torch.zeros(N, N, dtype=torch.long)
    for t in range(T):
        row = [int(e) for e in indices[t] if e >= 0]
        for j in range(k):
            e = int(indices[t, j])
            if e < 0:
                continue
            g = float(gates[t, j])
            sum_q[e] += g * q[t]
            mass[e] += g
            counts[e] += 1
        for e in row:
            for f in row:
                if e != f:
                    cosel[e, f] += 1
    return sum_q, mass, counts, cosel


def keystore_update_ref(keys, velocity, usage, sum_q, mass, counts, coselect, alpha, beta, delta,
                        theta_percentile, ema_decay, normalize=True):
    """docs/method.md §4, literally, in float64. Returns new (keys, velocity, usage)."""
    K = keys.double()
    N, d = K.shape
    V = velocity.double().clone()
    u = usage.double().clone()
    D = torch.stack([(K[e] - K).norm(dim=1) for e in range(N)]) if N else K.new_zeros(0, 0)  # ||K_e − K_f||, exact
    iu = torch.triu_indices(N, N, offset=1)
    theta = torch.quantile(D[iu[0], iu[1]], theta_percentile) if N > 1 else None
    new_K = torch.empty_like(K)
    for e in range(N):
        a = (sum_q[e].double() / mass[e].double() - K[e]) if mass[e] > 0 else torch.zeros(d, dtype=torch.float64)
        C = coselect[e].double().clone()
        C[e] = 0
        p = (C @ K / C.sum() - K[e]) if C.sum() > 0 else torch.zeros(d, dtype=torch.float64)
        r = torch.zeros(d, dtype=torch.float64)
        if theta is not None:
            close = torch.nonzero((D[e] < theta) & (torch.arange(N) != e)).flatten()
            if close.numel():
                r = ((K[e] - K[close]) / D[e, close].clamp_min(1e-8)[:, None]).mean(0)
        step = alpha * a + beta * p + delta * r
        V[e] = ema_decay * V[e] + (1 - ema_decay) * step
        new_K[e] = K[e] + V[e]
        if normalize:
            new_K[e] = new_K[e] / new_K[e].norm().clamp_min(1e-12)
    total = counts.sum()
    share = counts.double() / total if total > 0 else torch.zeros(N, dtype=torch.float64)
    u = ema_decay * u + (1 - ema_decay) * share
    return new_K, V, u
