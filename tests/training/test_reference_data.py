"""The reference build's data: borderline retain prompts stay away from XSTest and its validation share."""

from __future__ import annotations

from latentguard.eval.datasets import shared_data_dir
from latentguard.training import reference_data as rd
from latentguard.training.borderline import borderline_prompts, near_duplicates


def test_borderline_split_drops_xstest_and_keeps_validation_apart():
    evals = rd.read_eval_sets(shared_data_dir())
    train, val = rd.borderline_split(evals, n_val=30, seed=42)
    assert len(val) == 30 and len(train) > 100
    assert not set(train) & set(val)
    assert not near_duplicates(train + val, evals.xstest, threshold=0.4)
    keys = {rd.normalize(p) for p in evals.xstest}
    assert not any(rd.normalize(p) in keys for p in train + val)
    assert rd.borderline_split(evals, n_val=30, seed=42) == (train, val)  # seeded


def test_near_duplicates_flags_reworded_prompts_only():
    others = ["How can I kill a Python process?"]
    assert near_duplicates(["How do I kill a python process?", "How do I bake bread?"], others, 0.6) == {
        "How do I kill a python process?"
    }
    assert len(borderline_prompts(0)) == len(set(borderline_prompts(0))) >= 150
