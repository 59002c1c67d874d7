"""Metrics on hand-made inputs with exact expected values; answer NLL against a manual forward."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
import torch

from latentguard.eval.metrics import (
    N_RESAMPLES,
    answer_nll,
    bootstrap_ci,
    clean_gsm8k_answer,
    degenerate_rate,
    distinct_2,
    estimate,
    exact_match,
    gsm8k_reference,
    last_number,
    rate,
    refusal_metrics,
    score_metrics,
    utility_metrics,
)
from latentguard.models import LoadedModel, format_prompts, model_info


def test_rate_excludes_none_and_reports_n() -> None:
    r = rate([True, False, True, None])
    assert (r.value, r.n) == (pytest.approx(2 / 3), 3)
    assert r.lo <= r.value <= r.hi
    assert rate([]).as_dict() == {"value": None, "ci95": None, "n": 0}


def test_constant_and_two_point_bootstrap_intervals() -> None:
    assert rate([True] * 7).as_dict() == {"value": 1.0, "ci95": [1.0, 1.0], "n": 7}
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)  # 2000 resamples of 2 items hit both extremes
    assert bootstrap_ci([0.0, 1.0]) == bootstrap_ci([0.0, 1.0])  # fixed seed


def test_bootstrap_matches_the_normal_approximation_on_a_large_sample() -> None:
    lo, hi = bootstrap_ci([1.0] * 500 + [0.0] * 500)
    half = 1.96 * math.sqrt(0.25 / 1000)
    assert lo == pytest.approx(0.5 - half, abs=0.006) and hi == pytest.approx(0.5 + half, abs=0.006)
    assert N_RESAMPLES == 2000


def test_ratio_estimate_pools_tokens() -> None:
    e = estimate([2.0, 4.0], [1.0, 3.0])
    assert e.value == 1.5 and e.n == 2 and (e.lo, e.hi) == (pytest.approx(4 / 3), 2.0)  # resamples: 4/2, 8/6, 6/4


def test_refusal_metrics_harmful_and_overrefusal() -> None:
    m = refusal_metrics([True, False, None, True], "harmful")
    assert (m["n"], m["n_excluded"]) == (4, 1)
    assert m["refusal_rate"]["value"] == pytest.approx(2 / 3)
    assert m["asr"]["value"] == pytest.approx(1 / 3)
    lo, hi = m["refusal_rate"]["ci95"]
    assert m["asr"]["ci95"] == pytest.approx([1 - hi, 1 - lo])  # same resamples, complement
    o = refusal_metrics([True, False, False, False], "overrefusal")
    assert o["overrefusal_rate"]["value"] == 0.25 and "asr" not in o


def test_score_metrics() -> None:
    m = score_metrics([1, 5, 4, None, 2])
    assert (m["n"], m["n_unparsed"]) == (5, 1)
    assert m["mean_score"]["value"] == 3.0
    assert m["rate_ge4"]["value"] == 0.5
    assert m["rate_5"]["value"] == 0.25


def test_distinct_2_and_degenerate_rate() -> None:
    assert distinct_2("a b a b a b") == 0.4
    assert distinct_2("one") == 1.0
    assert degenerate_rate(["a b a b a b", "the cat sat on the mat"]).value == 0.5


@pytest.mark.parametrize(
    ("response", "answer", "ok"),
    [
        ("So she makes 9 * 2 = $18 every day.", "... #### 18", True),
        ("The total is 1,234.", "#### 1234", True),
        ("It is 18.00 dollars", "#### 18", True),
        ("-3 degrees", "#### -3", True),
        ("72.5 clips", "#### 72", False),
        ("no idea", "#### 5", False),
        ("5", "no reference marker", False),
    ],
)
def test_gsm8k_exact_match(response: str, answer: str, ok: bool) -> None:
    assert exact_match(response, answer) is ok


def test_gsm8k_parsing_and_cleaning() -> None:
    assert gsm8k_reference("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == Decimal(72)
    assert gsm8k_reference("#### 1,000") == Decimal(1000)
    assert last_number("first 3, then 4.") == Decimal(4)
    assert clean_gsm8k_answer("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


def test_answer_nll_equals_manual_teacher_forcing(tiny_llama, tiny_tokenizer) -> None:
    loaded = LoadedModel(tiny_llama, tiny_tokenizer, model_info(tiny_llama))
    prompts = format_prompts(tiny_tokenizer, ["What is 2+2?", "Hi"])
    answers = ["It is 4.", "Hello there, friend."]
    got = answer_nll(loaded, prompts, answers, batch_size=2)  # batched, left-padded
    for (nll, n), p, a in zip(got, prompts, answers):
        pi = tiny_tokenizer(p, add_special_tokens=False)["input_ids"]
        ai = tiny_tokenizer(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(torch.tensor([pi + ai])).logits[0].double(), -1)
        want = -sum(logp[len(pi) - 1 + j, t].item() for j, t in enumerate(ai))
        assert n == len(ai)
        assert nll == pytest.approx(want, rel=1e-4)


def test_utility_metrics() -> None:
    m = utility_metrics([(2.0, 1), (4.0, 3)], [True, False])
    assert m["nll_per_token"]["value"] == 1.5 and m["nll_per_token"]["n_tokens"] == 4
    assert m["perplexity"] == pytest.approx(np.exp(1.5))
    assert m["exact_match"]["value"] == 0.5 and m["n"] == 2
