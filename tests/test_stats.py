"""some.stats: Friedman average ranks and test over blocks (dataset × seed)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats as sps

from some.analysis.stats import friedman

# Three blocks, four variants, ties in blocks b1 and b2 (lower is better).
TIED = {
    "b1": {"A": 1.0, "B": 2.0, "C": 2.0, "D": 3.0},  # ranks 1, 2.5, 2.5, 4
    "b2": {"A": 0.5, "B": 0.5, "C": 0.5, "D": 0.1},  # ranks 3, 3, 3, 1
    "b3": {"A": 3.0, "B": 1.0, "C": 2.0, "D": 4.0},  # ranks 3, 1, 2, 4
}


def test_average_ranks_with_ties_by_hand():
    r = friedman(TIED)
    assert r.n_blocks == 3 and r.n_variants == 4 and r.reason is None
    assert list(r.avg_ranks) == ["A", "B", "C", "D"]
    want = {"A": 7 / 3, "B": 6.5 / 3, "C": 7.5 / 3, "D": 9 / 3}
    assert r.avg_ranks == pytest.approx(want, abs=1e-12)
    assert r.ranks["b1"] == {"A": 1.0, "B": 2.5, "C": 2.5, "D": 4.0}
    assert r.ranking() == ["B", "A", "C", "D"]


def test_higher_is_better_reverses_ranks():
    r = friedman(TIED, lower_is_better=False)
    # Within a block of k variants, rank_high = k + 1 - rank_low (ties included).
    want = {"A": 5 - 7 / 3, "B": 5 - 6.5 / 3, "C": 5 - 7.5 / 3, "D": 5 - 9 / 3}
    assert r.avg_ranks == pytest.approx(want, abs=1e-12)
    assert r.ranks["b2"] == {"A": 2.0, "B": 2.0, "C": 2.0, "D": 4.0}
    assert r.ranking()[0] == "D"
    # The test statistic does not depend on the direction.
    assert r.statistic == pytest.approx(friedman(TIED).statistic, rel=1e-12)


def test_statistic_and_p_value_equal_scipy():
    rng = np.random.default_rng(0)
    table = np.round(rng.normal(size=(8, 5)) + np.arange(5) * 0.3, 1)  # rounding makes some ties
    r = friedman(table, variants=list("abcde"))
    want = sps.friedmanchisquare(*table.T)
    assert r.statistic == pytest.approx(float(want.statistic), rel=1e-12)
    assert r.p_value == pytest.approx(float(want.pvalue), rel=1e-12)
    assert 0 < r.p_value < 1
    ranks = sps.rankdata(table, axis=1)
    assert list(r.avg_ranks.values()) == pytest.approx(ranks.mean(0).tolist(), abs=1e-12)


def test_textbook_pulse_rates():
    # Sprent & Smeeton, Applied Nonparametric Statistical Methods (3rd ed.), §6.3.2
    # (the example of the scipy docs): pulse rates of 7 students before, immediately
    # after and 5 minutes after exercise. No ties: rank sums 10, 21, 11 and
    # chi² = 12/(n k (k+1)) Σ R² − 3 n (k+1) = 662/7 − 84 = 10.571..., p = 0.00506.
    before = [72, 96, 88, 92, 74, 76, 82]
    immediately = [120, 120, 132, 120, 101, 96, 112]
    five_min = [76, 95, 104, 96, 84, 72, 76]
    scores = {f"student{i}": {"before": b, "immediately": a, "five_min": f}
              for i, (b, a, f) in enumerate(zip(before, immediately, five_min))}
    r = friedman(scores)
    assert r.avg_ranks == pytest.approx({"before": 10 / 7, "immediately": 3.0, "five_min": 11 / 7}, abs=1e-12)
    assert r.statistic == pytest.approx(662 / 7 - 84, rel=1e-12)
    assert r.statistic == pytest.approx(10.5714, abs=1e-4)
    assert r.p_value == pytest.approx(np.exp(-r.statistic / 2), rel=1e-12)  # chi² with 2 d.o.f.
    assert r.p_value == pytest.approx(0.00506, abs=1e-5)


def test_textbook_with_ties_nag_g08ae():
    # NAG Library example g08aec: 18 blocks, 3 groups, one tied block; NAG reports
    # the statistic without tie correction, 8.583. scipy (and we) divide it by
    # C = 1 − Σ(t³ − t) / (n k (k² − 1)) = 1 − 6/432.
    g1 = [1, 2, 1, 1, 3, 2, 3, 1, 3, 3, 2, 2, 3, 2, 2.5, 3, 3, 2]
    g2 = [3, 3, 3, 2, 1, 3, 2, 3, 1, 1, 3, 3, 2, 3, 2.5, 2, 2, 3]
    g3 = [2, 1, 2, 3, 2, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    r = friedman(np.array([g1, g2, g3]).T, variants=["g1", "g2", "g3"])
    assert [v * 18 for v in r.avg_ranks.values()] == pytest.approx([39.5, 42.5, 26.0], abs=1e-9)
    assert r.statistic * (1 - 6 / 432) == pytest.approx(8.583, abs=5e-4)


def test_two_variants_gives_ranks_without_test():
    r = friedman({"d1": {"x": 1.0, "y": 2.0}, "d2": {"x": 3.0, "y": 2.0}, "d3": {"x": 0.0, "y": 1.0}})
    assert r.avg_ranks == pytest.approx({"x": 4 / 3, "y": 5 / 3})
    assert r.statistic is None and r.p_value is None
    assert "at least 3 variants" in r.reason


def test_one_block_gives_ranks_without_test():
    r = friedman([[0.3, 0.1, 0.2]], variants=["a", "b", "c"], blocks=["only"])
    assert r.avg_ranks == {"a": 3.0, "b": 1.0, "c": 2.0}
    assert r.statistic is None and r.p_value is None and r.n_blocks == 1
    assert "at least 2 blocks" in r.reason


def test_complete_ties_give_no_test_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy would divide 0 by 0 here
        r = friedman(np.ones((4, 3)))
    assert r.avg_ranks == {"v0": 2.0, "v1": 2.0, "v2": 2.0}
    assert r.statistic is None and "ties" in r.reason


def test_dict_and_array_inputs_agree():
    table = [[3.0, 1.0, 2.0, 5.0], [2.0, 2.0, 1.0, 0.5], [4.0, 3.0, 1.0, 2.0]]
    names = ["p", "q", "r", "s"]
    as_dict = {f"ds{i}/seed0": dict(zip(names, row)) for i, row in enumerate(table)}
    a = friedman(as_dict)
    b = friedman(np.array(table), variants=names, blocks=list(as_dict))
    assert a == b
    # The dict's variant order can be given; the ranks follow the names, not the order.
    c = friedman(as_dict, variants=["s", "r", "q", "p"])
    assert list(c.avg_ranks) == ["s", "r", "q", "p"] and c.avg_ranks["p"] == a.avg_ranks["p"]


def test_invalid_tables():
    with pytest.raises(ValueError, match=r"variant 'B' in block 'b2' is nan"):
        friedman({"b1": {"A": 1.0, "B": 2.0, "C": 0.0}, "b2": {"A": 1.0, "B": float("nan"), "C": 0.0}})
    with pytest.raises(ValueError, match="is inf"):
        friedman(np.array([[1.0, np.inf, 2.0], [1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"block 'b2' must score exactly.*missing \['C'\]"):
        friedman({"b1": {"A": 1, "B": 2, "C": 3}, "b2": {"A": 1, "B": 2}})
    with pytest.raises(TypeError, match="must map variant -> score"):
        friedman({"b1": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="not a number"):
        friedman({"b1": {"A": "low", "B": 2, "C": 3}})
    with pytest.raises(ValueError, match="2-D"):
        friedman([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="no blocks"):
        friedman({})
    with pytest.raises(ValueError, match="2 variant names for a table with 3 columns"):
        friedman(np.zeros((2, 3)), variants=["a", "b"])
    with pytest.raises(ValueError, match="duplicate variant"):
        friedman(np.zeros((2, 2)), variants=["a", "a"])
