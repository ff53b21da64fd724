"""Tests of some.metrics against hand-computed cases (docs/method.md §6 definitions)."""
import math

import numpy as np
import pytest
import torch

from some.analysis.metrics import (
    ExpertsUsed,
    entropy_bits,
    experts_used,
    format_experts_used,
    gini,
    max_entropy_bits,
    usage_counts,
    usage_summary,
)


# ----------------------------------------------------------------------------- usage_counts
def test_usage_counts_ignores_minus_one_tensor_and_numpy():
    idx = [[0, 3, -1], [3, 3, 1], [-1, -1, -1]]
    want = [1, 1, 0, 3, 0]
    t = usage_counts(torch.tensor(idx), 5)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.tolist() == want
    a = usage_counts(np.array(idx, dtype=np.int32), 5)
    assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.tolist() == want
    assert usage_counts(idx, 5).tolist() == want  # plain lists work too
    assert usage_counts(torch.empty(0, 4, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_usage_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range: found 5"):
        usage_counts(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="out of range: found -2"):
        usage_counts(np.array([-2, 0]), 5)
    with pytest.raises(ValueError, match="integer"):
        usage_counts(torch.tensor([0.0, 1.0]), 5)
    with pytest.raises(ValueError, match="integers"):
        usage_counts(np.array([0.5]), 5)
    with pytest.raises(ValueError, match="num_experts"):
        usage_counts(torch.tensor([0]), 0)


# ----------------------------------------------------------------------------- gini
@pytest.mark.parametrize("counts, want", [
    ([0, 0, 0, 4], 0.75),  # (2·4−5)·4 / (4·4): one expert takes all -> (n−1)/n
    ([4, 0, 0, 0], 0.75),  # order does not matter (sorted first)
    ([1, 2, 3, 4], 0.25),  # (−3·1 − 1·2 + 1·3 + 3·4) / (4·10) = 10/40
    ([5, 5, 5, 5], 0.0),
    ([0, 0, 0, 0], 0.0),  # nothing routed: defined as 0
    ([7], 0.0),
    ([0, 1], 0.5),
    ([1, 3], 0.25),  # (−1·1 + 1·3) / (2·4)
])
def test_gini_hand_computed(counts, want):
    assert gini(counts) == pytest.approx(want, abs=1e-12)
    assert gini(torch.tensor(counts)) == pytest.approx(want, abs=1e-12)
    assert gini(np.array(counts, dtype=np.float32)) == pytest.approx(want, abs=1e-12)


def test_gini_matches_mean_absolute_difference_form():
    # G = Σ_i Σ_j |c_i − c_j| / (2 n² mean): an independent formula for the same quantity
    c = np.random.default_rng(0).integers(0, 1000, size=37).astype(float)
    ref = np.abs(c[:, None] - c[None, :]).sum() / (2 * c.size ** 2 * c.mean())
    assert gini(c) == pytest.approx(ref, rel=1e-12)
    assert gini(c * 3.5) == pytest.approx(ref, rel=1e-12)  # scale-invariant


# ----------------------------------------------------------------------------- entropy
@pytest.mark.parametrize("counts, want", [
    ([0, 0, 0, 4], 0.0),
    ([1, 1, 1, 1], 2.0),
    ([1, 1], 1.0),
    ([1, 3], 2 - 0.75 * math.log2(3)),  # −(¼ log2 ¼ + ¾ log2 ¾)
    ([1, 2, 3, 4], -sum(p * math.log2(p) for p in (0.1, 0.2, 0.3, 0.4))),
    ([0, 0], 0.0),
])
def test_entropy_hand_computed(counts, want):
    assert entropy_bits(counts) == pytest.approx(want, abs=1e-12)
    assert entropy_bits(torch.tensor(counts, dtype=torch.float64)) == pytest.approx(want, abs=1e-12)


def test_entropy_of_uniform_is_max():
    for n in (1, 2, 64, 512):
        assert max_entropy_bits(n) == math.log2(n)
        assert entropy_bits(np.full(n, 17)) == pytest.approx(max_entropy_bits(n), abs=1e-12)
        assert gini(np.full(n, 17)) == pytest.approx(0.0, abs=1e-12)
    assert entropy_bits([1, 2, 3, 4]) < max_entropy_bits(4)
    assert entropy_bits([0, 0, 4]) == 0.0 and math.copysign(1, entropy_bits([0, 0, 4])) == 1  # not −0.0
    with pytest.raises(ValueError):
        max_entropy_bits(0)


# ----------------------------------------------------------------------------- experts used
def test_experts_used_and_format():
    assert experts_used([3, 0, 1, 0]) == ExpertsUsed(2, 4, 0.5)
    assert format_experts_used(torch.ones(64)) == "64/64 (100.00%)"
    assert format_experts_used([1, 0, 0]) == "1/3 (33.33%)"
    assert format_experts_used(np.zeros(8)) == "0/8 (0.00%)"


def test_usage_summary_and_pipeline_from_indices():
    indices = torch.tensor([[0, 1], [0, 2], [0, -1]])
    s = usage_summary(usage_counts(indices, 4))  # counts [3, 1, 1, 0]
    assert s["experts_used"] == 3 and s["num_experts"] == 4 and s["total_count"] == 5
    assert s["gini"] == pytest.approx((-3 * 0 - 1 * 1 + 1 * 1 + 3 * 3) / (4 * 5))
    assert s["entropy_bits"] == pytest.approx(-(0.6 * math.log2(0.6) + 2 * 0.2 * math.log2(0.2)))
    assert s["max_entropy_bits"] == 2.0


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"),
    ([[1, 2], [3, 4]], "1-D"),
    ([1, -1], "non-negative"),
    ([1, float("nan")], "finite"),
    ([1, float("inf")], "finite"),
])
def test_bad_counts_raise(bad, match):
    for fn in (gini, entropy_bits, experts_used):
        with pytest.raises(ValueError, match=match):
            fn(bad)
