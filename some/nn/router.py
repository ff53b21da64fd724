"""The router of a SoME layer (docs/method.md §2, §3 step 1): queries from the layer input.

:class:`Router` maps the layer input to queries with its kind's network (``mlp``
``d -> 2d -> d``, ``linear`` ``d -> d``; ``frozen`` never trains, ``random`` is
re-drawn every step) and pools them to one query per sequence at ``sequence``
level. What it returns, :class:`Queries`, is the one place that knows whether a
routed row is a token or a sequence: everything downstream expands per-row
results to tokens through it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import SoMELayerConfig

__all__ = ["Queries", "Router"]


@dataclass(frozen=True)
class Queries:
    """A batch's router outputs. ``rows`` ``(R, d)`` are what is routed: every token
    (``R = B·S``) or every sequence (``R = B``, the mean of its real tokens' outputs);
    ``real`` ``(R,)`` marks rows with a real token (None: all are real)."""

    rows: Tensor
    real: Tensor | None
    batch: int  # B
    seq: int  # S
    per_sequence: bool

    def per_token(self, t: Tensor) -> Tensor:
        """``t`` ``(R, ...)`` of the rows as ``(B·S, ...)`` of the tokens."""
        if not self.per_sequence:
            return t
        B, S = self.batch, self.seq
        return t.unsqueeze(1).expand(B, S, *t.shape[1:]).reshape(B * S, *t.shape[1:])


class Router(nn.Module):
    def __init__(self, config: SoMELayerConfig, *, seed: int, layer: int, device=None, dtype=None):
        super().__init__()
        d = config.d_model
        factory = {"device": device, "dtype": dtype}
        self.kind, self.level = config.router, config.routing_level
        if self.kind == "linear":
            self.net = nn.Linear(d, d, **factory)
        else:
            self.net = nn.Sequential(nn.Linear(d, 2 * d, **factory), nn.GELU(), nn.Linear(2 * d, d, **factory))
        if self.kind in ("frozen", "random"):
            self.net.requires_grad_(False)
        self._redraw_seed = seed + layer + 1
        self.reset_generator()

    def reset_generator(self) -> None:
        """The generator that re-draws a ``random`` router, at its start. It lives on the CPU
        whatever the router's device: the draws are the same on every device, survive
        ``.to()``, and its saved state resumes anywhere."""
        self._gen = torch.Generator().manual_seed(self._redraw_seed)

    def forward(self, x: Tensor, token_mask: Tensor | None) -> Queries:
        """``x`` ``(B, S, d)``, ``token_mask`` ``(B, S)`` of real tokens or None."""
        B, S, d = x.shape
        q = self.net(x)  # (B, S, d)
        if self.level == "sequence":  # one query per sequence: the mean over its real tokens
            if token_mask is None:
                return Queries(q.mean(dim=1), None, B, S, True)
            m = token_mask.unsqueeze(-1).to(q.dtype)
            return Queries((q * m).sum(1) / m.sum(1).clamp_min(1), token_mask.any(dim=1), B, S, True)
        real = None if token_mask is None else token_mask.reshape(-1)
        return Queries(q.reshape(B * S, d), real, B, S, False)

    @torch.no_grad()
    def redraw(self) -> None:
        """A ``random`` router draws new weights (as ``nn.Linear`` initializes them) every step."""
        if self.kind != "random":
            return
        for mod in self.net.modules():
            if isinstance(mod, nn.Linear):
                bound = 1 / math.sqrt(mod.in_features)
                for t in (mod.weight, mod.bias):  # drawn on the CPU, then copied to the router's device
                    t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=self._gen))

    def rng_state(self) -> Tensor:
        """State of the re-drawing generator (for exact resume)."""
        return self._gen.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        self._gen.set_state(state)
