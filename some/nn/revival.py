"""Dead-expert revival (``revive_after``, a research knob in the spirit of
VQ-VAE codebook restarts): a key that no token selected in the last W key
updates moves to the normalized query of a token routed in the current step.

Both draws are Gumbel top-k / argsort over uniform numbers from a generator
the caller seeds by (seed, layer, step): no host synchronization on GPUs, the
same choice on every data-parallel rank (they see the same gathered
candidates) and after a resume.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .telemetry import RoutingTelemetry

__all__ = ["draw_candidates", "revive_dead_keys"]


def _gumbel(n: int, generator: torch.Generator, device) -> Tensor:
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


@torch.no_grad()
def draw_candidates(q: Tensor, real: Tensor | None, num: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Up to ``num`` distinct rows of ``q`` (real ones only), uniformly drawn:
    ``(num, d + 1)`` rows of [normalized query, 1]; rows beyond the real tokens are zeros."""
    g = _gumbel(q.shape[0], generator, q.device)
    if real is not None:
        g = g.masked_fill(~real, -math.inf)
    m = min(num, q.shape[0])
    top = torch.topk(g, m).indices
    cand = torch.zeros(num, q.shape[1] + 1, device=q.device, dtype=dtype)
    cand[:m, :-1] = torch.nn.functional.normalize(q[top].to(dtype), dim=-1)
    cand[:m, -1] = torch.isfinite(g[top]).to(dtype)
    return cand


@torch.no_grad()
def revive_dead_keys(keys: Tensor, velocity: Tensor, usage: Tensor, active: Tensor, telemetry: RoutingTelemetry,
                     candidates: Tensor, after: int, generator: torch.Generator,
                     selection_bias: Tensor | None = None) -> None:
    """Move every dead key (active, unselected in the last ``after`` updates) to a
    distinct valid candidate, drawn uniformly, as far as there are candidates;
    reset its velocity, usage and selection bias (balance_bias: it grew while the key was
    unused) and give it a new lease of ``after`` updates."""
    dead = active & telemetry.dead(after)
    valid = candidates[:, -1] > 0
    g = _gumbel(candidates.shape[0], generator, candidates.device).masked_fill(~valid, -math.inf)
    order = torch.argsort(g, descending=True)  # a uniform random order of the valid candidates first
    slot = torch.cumsum(dead.long(), 0) - 1  # the i-th dead key takes the i-th candidate
    chosen = order[slot.clamp(0, candidates.shape[0] - 1)]
    revive = dead & (slot < candidates.shape[0]) & valid[chosen]
    keys.copy_(torch.where(revive.unsqueeze(1), candidates[chosen, :-1], keys))
    velocity.masked_fill_(revive.unsqueeze(1), 0)
    usage.masked_fill_(revive, 0)
    if selection_bias is not None:
        selection_bias.masked_fill_(revive, 0)
    telemetry.last_used.copy_(torch.where(revive, telemetry.step - 1, telemetry.last_used))
    telemetry.revived += revive.sum()
