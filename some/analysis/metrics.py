"""Expert-utilization metrics of docs/method.md §6, for torch tensors and numpy arrays alike.

    counts = usage_counts(indices, num_experts)     # (N,) tokens routed to each expert
    gini(counts), entropy_bits(counts), max_entropy_bits(len(counts))
    format_experts_used(counts)                     # '64/64 (100.00%)'

Definitions (docs/method.md §6): usage counts ``c_e`` over all routed (token, slot) pairs; Gini
``G = Σ_i (2i − n − 1) c_(i) / (n Σ c)`` with ``c_(i)`` ascending, ``i = 1..n``; entropy
``H = −Σ p_e log2 p_e`` with ``p = c / Σ c`` and ``0 · log 0 = 0``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Union

import numpy as np
import torch

__all__ = ["as_counts", "usage_counts", "gini", "entropy_bits", "max_entropy_bits", "experts_used",
           "format_experts_used",
           "ExpertsUsed", "usage_summary"]

ArrayLike = Union[torch.Tensor, np.ndarray, "list[float]", "tuple[float, ...]"]


def usage_counts(indices: ArrayLike, num_experts: int) -> torch.Tensor | np.ndarray:
    """How many (token, slot) pairs selected each expert: an int64 vector of length ``num_experts``.

    ``indices`` has any shape (e.g. ``T x k`` from ``some.ops.route``); ``-1`` marks a slot that
    selected nothing and is ignored. A tensor gives a tensor on its device, anything else a numpy
    array. Raises ``ValueError`` for an index outside ``-1 .. num_experts-1`` or a non-integer dtype.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if isinstance(indices, torch.Tensor):
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"usage_counts: indices must be an integer tensor, got {indices.dtype}")
        flat = indices.reshape(-1).long()
        _check_range(flat.min().item() if flat.numel() else -1, flat.max().item() if flat.numel() else -1,
                      num_experts)
        flat = flat[flat >= 0]
        return torch.bincount(flat, minlength=num_experts)
    arr = np.asarray(indices)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"usage_counts: indices must be integers, got dtype {arr.dtype}")
    flat = arr.reshape(-1).astype(np.int64)
    if flat.size:
        _check_range(int(flat.min()), int(flat.max()), num_experts)
    return np.bincount(flat[flat >= 0], minlength=num_experts).astype(np.int64)


def _check_range(lo: int, hi: int, n: int) -> None:
    if lo < -1 or hi >= n:
        raise ValueError(f"usage_counts: expert index out of range: found {lo if lo < -1 else hi}, "
                         f"expected -1 (no expert) or 0..{n - 1}")


def as_counts(counts: ArrayLike) -> np.ndarray:
    """Counts as a float64 numpy vector, validated (finite, non-negative, non-empty, 1-D)."""
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().double().numpy()
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D vector (one entry per expert), got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("counts must be finite (found NaN or Inf)")
    if np.any(c < 0):
        raise ValueError(f"counts must be non-negative, found {c.min()}")
    return c


def gini(counts: ArrayLike) -> float:
    """Gini coefficient of the usage counts: 0 = perfectly balanced, (n−1)/n = one expert takes all.

    ``G = Σ_i (2i − n − 1) c_(i) / (n Σ c)``, ``c`` sorted ascending, ``i = 1..n``; 0 when all
    counts are 0 (nothing routed is not an imbalance).
    """
    c = np.sort(as_counts(counts))
    n, total = c.size, c.sum()
    if total == 0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2 * i - n - 1) * c) / (n * total))


def entropy_bits(counts: ArrayLike) -> float:
    """Shannon entropy in bits of the usage distribution ``p = c / Σ c`` (``0 · log 0 = 0``);
    0 when all counts are 0. At most :func:`max_entropy_bits` ``(n)``, reached by uniform usage."""
    c = as_counts(counts)
    total = c.sum()
    if total == 0:
        return 0.0
    p = c[c > 0] / total
    h = float(-np.sum(p * np.log2(p)))
    return h if h > 0 else 0.0  # a one-hot distribution gives -0.0, which prints as "-0.00"


def max_entropy_bits(n: int) -> float:
    """``log2 n``: the entropy of uniform usage of ``n`` experts."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"max_entropy_bits needs a positive number of experts, got {n!r}")
    return math.log2(n)


class ExpertsUsed(NamedTuple):
    used: int  # experts with a non-zero count
    total: int  # all experts
    fraction: float  # used / total

    def __str__(self) -> str:
        return f"{self.used}/{self.total} ({100 * self.fraction:.2f}%)"


def experts_used(counts: ArrayLike) -> ExpertsUsed:
    """How many experts were used at least once: ``(used, total, fraction)``."""
    c = as_counts(counts)
    used = int(np.count_nonzero(c))
    return ExpertsUsed(used, c.size, used / c.size)


def format_experts_used(counts: ArrayLike) -> str:
    """``'used/total (percent%)'``, e.g. ``'64/64 (100.00%)'`` (the run report's line)."""
    return str(experts_used(counts))


def usage_summary(counts: ArrayLike) -> dict[str, float]:
    """All of the above in one dict (for ``metrics.jsonl`` and report tables)."""
    c = as_counts(counts)
    used = experts_used(c)
    return {"num_experts": c.size, "experts_used": used.used, "experts_used_fraction": used.fraction,
            "gini": gini(c), "entropy_bits": entropy_bits(c), "max_entropy_bits": max_entropy_bits(c.size),
            "total_count": float(c.sum())}
