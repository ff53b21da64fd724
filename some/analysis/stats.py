"""Comparing variants across datasets × seeds (docs/method.md §7, "Friedman average rank
of the variants across datasets × seeds with the Friedman test's p-value").

A *block* is one (dataset, seed) pair; every variant has one score per block.
Within each block the variants are ranked (1 = best; ties share their average
rank, as ``scipy.stats.rankdata(method="average")``), the ranks are averaged
over blocks, and the Friedman test (``scipy.stats.friedmanchisquare``,
chi-square approximation with the tie correction) says whether the variants'
rankings differ more than chance would give (Demšar 2006, JMLR 7).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FriedmanResult:
    """Average ranks and Friedman test of variants over blocks.

    Attributes:
        avg_ranks: variant -> average rank over blocks (1 = best), in input order.
        statistic: Friedman chi-square statistic (tie-corrected, as scipy), or
            None when the test is not defined for the table (see ``reason``).
        p_value: its p-value (chi-square with ``n_variants - 1`` degrees of
            freedom), or None with ``statistic``.
        n_blocks: number of blocks (dataset × seed).
        n_variants: number of variants.
        ranks: block -> variant -> rank within that block.
        reason: why ``statistic``/``p_value`` are None, else None.
        lower_is_better: the direction the scores were ranked in.
    """

    avg_ranks: dict[str, float]
    statistic: float | None
    p_value: float | None
    n_blocks: int
    n_variants: int
    ranks: dict[str, dict[str, float]]
    reason: str | None = None
    lower_is_better: bool = True

    def ranking(self) -> list[str]:
        """Variants best first (lowest average rank); equal ranks keep input order."""
        return sorted(self.avg_ranks, key=lambda v: self.avg_ranks[v])


def _as_float(value: Any, where: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"friedman: score {where} is not a number: {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"friedman: score {where} is {out}; every block needs a finite score for every variant")
    return out


def _table(scores: Any, variants: Sequence[str] | None, blocks: Sequence[str] | None):
    """(table (n_blocks, n_variants) float64, block names, variant names)."""
    if isinstance(scores, Mapping):
        if blocks is not None:
            raise ValueError("friedman: 'blocks' is only for array input; a dict already names its blocks")
        block_names = [str(b) for b in scores]
        if not block_names:
            raise ValueError("friedman: no blocks given")
        rows = list(scores.values())
        for b, row in zip(block_names, rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"friedman: block {b!r} must map variant -> score, got {type(row).__name__}")
        names = [str(v) for v in (variants if variants is not None else rows[0])]
        if len(set(names)) != len(names):
            raise ValueError(f"friedman: duplicate variant names in {names}")
        table = np.empty((len(rows), len(names)))
        for i, (b, row) in enumerate(zip(block_names, rows)):
            row = {str(k): v for k, v in row.items()}
            missing, extra = set(names) - set(row), set(row) - set(names)
            if missing or extra:
                raise ValueError(
                    f"friedman: block {b!r} must score exactly the variants {names}; "
                    f"missing {sorted(missing)}, unexpected {sorted(extra)}"
                )
            for j, v in enumerate(names):
                table[i, j] = _as_float(row[v], f"of variant {v!r} in block {b!r}")
        return table, block_names, names

    arr = np.asarray(scores, dtype=object)  # object: the per-cell check below names bad cells
    if arr.ndim != 2:
        raise ValueError(f"friedman: scores must be a dict {{block: {{variant: score}}}} or a 2-D "
                         f"(blocks x variants) array, got an array of shape {arr.shape}")
    n_b, n_v = arr.shape
    if n_b == 0 or n_v == 0:
        raise ValueError(f"friedman: empty table of shape {arr.shape}")
    names = [str(v) for v in variants] if variants is not None else [f"v{j}" for j in range(n_v)]
    block_names = [str(b) for b in blocks] if blocks is not None else [f"b{i}" for i in range(n_b)]
    if len(names) != n_v:
        raise ValueError(f"friedman: {len(names)} variant names for a table with {n_v} columns (variants)")
    if len(block_names) != n_b:
        raise ValueError(f"friedman: {len(block_names)} block names for a table with {n_b} rows (blocks)")
    if len(set(names)) != n_v:
        raise ValueError(f"friedman: duplicate variant names in {names}")
    table = np.empty((n_b, n_v))
    for i in range(n_b):
        for j in range(n_v):
            table[i, j] = _as_float(arr[i, j], f"of variant {names[j]!r} in block {block_names[i]!r}")
    return table, block_names, names


def friedman(scores: Any, lower_is_better: bool = True, *, variants: Sequence[str] | None = None,
             blocks: Sequence[str] | None = None) -> FriedmanResult:
    """Average ranks of variants over blocks and the Friedman test.

    Args:
        scores: ``{block: {variant: score}}`` (every block scores the same
            variants), or a 2-D array-like of shape ``(n_blocks, n_variants)``
            with the names in ``variants`` / ``blocks`` (default ``v0, v1, …``
            and ``b0, b1, …``).
        lower_is_better: rank the lowest score 1 (perplexity, loss); False for
            accuracy-like scores.
        variants: for dict input, the order of the variants in the result
            (default: the first block's order).

    The statistic and p-value are None, with ``reason`` saying why, when the
    test is undefined: fewer than 3 variants (``friedmanchisquare`` needs 3),
    fewer than 2 blocks, or every block a complete tie. The ranks are always
    given. NaN/Inf or missing scores raise ``ValueError``.
    """
    from scipy.stats import friedmanchisquare, rankdata

    table, block_names, names = _table(scores, variants, blocks)
    if len(set(block_names)) != len(block_names):
        raise ValueError(f"friedman: duplicate block names in {block_names}")
    n_b, n_v = table.shape
    # rankdata ranks ascending; negating ranks the highest first (ties stay ties).
    ranks = rankdata(table if lower_is_better else -table, method="average", axis=1)
    avg = ranks.mean(axis=0)

    reason = None
    if n_v < 3:
        reason = f"the Friedman test needs at least 3 variants, got {n_v}"
    elif n_b < 2:
        reason = f"the Friedman test needs at least 2 blocks (dataset x seed), got {n_b}"
    elif all(np.all(row == row[0]) for row in table):
        # The tie correction is 0/0 here (scipy returns NaN with a warning).
        reason = "every block ties all variants: the rankings carry no information"
    statistic = p_value = None
    if reason is None:
        res = friedmanchisquare(*table.T)  # one sample per variant, paired by block
        statistic, p_value = float(res.statistic), float(res.pvalue)

    return FriedmanResult(
        avg_ranks={v: float(r) for v, r in zip(names, avg)},
        statistic=statistic,
        p_value=p_value,
        n_blocks=n_b,
        n_variants=n_v,
        ranks={b: {v: float(r) for v, r in zip(names, row)} for b, row in zip(block_names, ranks)},
        reason=reason,
        lower_is_better=lower_is_better,
    )


__all__ = ["FriedmanResult", "friedman"]
