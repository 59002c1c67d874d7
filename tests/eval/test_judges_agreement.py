"""Agreement statistics on synthetic labels with known values (judges.md small-scale check 4)."""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import binomtest

from latentguard.errors import ConfigError, DataError
from latentguard.eval.judges import agreement, cohen_kappa, mcnemar_exact, pabak


def _labels(n11: int, n10: int, n01: int, n00: int) -> tuple[list[bool], list[bool]]:
    a = [True] * n11 + [True] * n10 + [False] * n01 + [False] * n00
    b = [True] * n11 + [False] * n10 + [True] * n01 + [False] * n00
    return a, b


def test_known_values_n100_po09_balanced_marginals():
    a, b = _labels(45, 5, 5, 45)
    res = agreement(a, b)
    assert res.n == 100 and res.table == ((45, 5), (5, 45))
    assert res.p_o == pytest.approx(0.9) and res.rate_a == res.rate_b == pytest.approx(0.5)
    assert res.kappa == pytest.approx(0.8) and res.pabak == pytest.approx(0.8)
    assert res.mcnemar_p == 1.0 and res.higher is None
    for key, value in (("p_o", 0.9), ("kappa", 0.8), ("pabak", 0.8)):
        lo, hi = res.ci[key]
        assert lo < value < hi and hi - lo < 0.4
    assert agreement(a, b).ci == res.ci  # fixed seed
    assert agreement(a, b, seed=1).ci != res.ci


def test_all_same_labels_give_nan_kappa_and_defined_pabak():
    res = agreement([True] * 20, [True] * 20)
    assert math.isnan(res.kappa) and res.pabak == 1.0 and res.p_o == 1.0
    assert math.isnan(cohen_kappa(0, 0, 0, 20))
    d = res.to_dict()
    assert d["kappa"] is None and d["ci"]["kappa"] == [None, None]
    json.dumps(d, allow_nan=False)


def test_kappa_paradox_and_pabak():
    # 90% agreement at extreme prevalence: kappa is low while PABAK stays high.
    assert cohen_kappa(85, 5, 5, 5) == pytest.approx((0.9 - (0.9 * 0.9 + 0.1 * 0.1)) / (1 - 0.82))
    assert pabak(85, 5, 5, 5) == pytest.approx(0.8)


@pytest.mark.parametrize("b,c", [(0, 6), (1, 9), (5, 5), (3, 17), (40, 25), (0, 0)])
def test_exact_mcnemar_matches_a_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected)


def test_higher_rate_excluded_items_and_examples():
    a, b = _labels(10, 2, 8, 30)
    a += [None, True]
    b += [True, None]
    ids = [f"item{i}" for i in range(len(a))]
    res = agreement(a, b, ids, names=("keyword", "llm"))
    assert res.n == 50 and res.n_excluded == 2 and res.table == ((30, 8), (2, 10))
    assert res.higher == "llm" and res.rate_b > res.rate_a  # the LLM judge reports the higher ASR
    assert res.mcnemar_p == pytest.approx(binomtest(2, 10, 0.5).pvalue)
    assert res.examples == {"keyword_only": ["item10", "item11"], "llm_only": [f"item{i}" for i in range(12, 17)]}


def test_input_errors():
    with pytest.raises(DataError, match="one label per item"):
        agreement([True], [True, False])
    with pytest.raises(DataError, match="No item has labels from both"):
        agreement([None, True], [False, None])
    with pytest.raises(ConfigError, match="n_boot=0"):
        agreement([True], [True], n_boot=0)
