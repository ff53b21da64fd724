"""Names and result types shared by every backend of the SoME ops."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "GATINGS", "SCORE_MODES", "ExpertSpec", "KeystoreStats", "RouteResult"]

GATINGS = ("softmax", "sigmoid", "relu", "avg_k", "top_p", "top_any")
SCORE_MODES = ("cosine", "dot")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class RouteResult(NamedTuple):
    indices: Tensor  # (T, k) int64, -1 for an empty slot
    gates: Tensor  # (T, k) query dtype, 0 for an empty slot
    scores: Tensor  # (T, k) query dtype


class KeystoreStats(NamedTuple):
    sum_q: Tensor  # (N, d) Σ g q̂ per expert (float32, float64 for float64 queries)
    mass: Tensor  # (N,) Σ g per expert
    counts: Tensor  # (N,) int64 selections per expert
    coselect: Tensor  # (N, N) int64 co-selection counts, zero diagonal: dense or sparse COO (some.ops.coselect)

    def __add__(self, other: KeystoreStats) -> KeystoreStats:  # type: ignore[override]
        return KeystoreStats(*(a + b for a, b in zip(self, other, strict=True)))


class ExpertSpec(NamedTuple):
    """Procedural experts (docs/method.md §9): everything their weights are a function of.

    Expert ``e``'s ``W1 (h, d)``, ``b1 (h,)``, ``W2 (d, h)``, ``b2 (d,)`` are
    drawn by the generator of :mod:`some.ops.philox` from ``(seed, layer, e)``
    in float32 and rounded to ``dtype``; they are never stored.
    """

    seed: int
    layer: int
    num_experts: int  # N
    d_model: int  # d
    d_ffn: int  # h
    dtype: torch.dtype = torch.float32

    @property
    def parameters(self) -> int:
        """Weights the stored experts would hold (counted as the model's frozen parameters)."""
        d, h = self.d_model, self.d_ffn
        return self.num_experts * (2 * h * d + h + d)
