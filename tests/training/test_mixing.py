"""Data mixing: proportions, per-epoch re-sampling, seeding, fixed counts beyond a source's size."""

from __future__ import annotations

from collections import Counter

from latentguard.training.mixing import MixtureSampler, epoch_plan, per_epoch_count


def test_counts_from_fractions_and_fixed_counts():
    assert per_epoch_count(1.0, 300) == 300
    assert per_epoch_count(0.1, 300) == 30
    assert per_epoch_count(0.0001, 300) == 1
    assert per_epoch_count(50, 10) == 50


def test_mix_proportions_over_1000_draws():
    """Sources A (600 rows, 0.5) and B (100 rows, fixed 100): expected share of A = 300/400."""
    groups = [list(range(600)), list(range(600, 700))]
    counts = [per_epoch_count(0.5, 600), per_epoch_count(100, 100)]
    draws: list[int] = []
    epoch = 0
    while len(draws) < 1000:
        draws += epoch_plan(groups, counts, seed=3, epoch=epoch)
        epoch += 1
    share_a = sum(i < 600 for i in draws[:1000]) / 1000
    assert abs(share_a - 0.75) < 0.03
    first = draws[:400]
    assert len(set(first)) == 400  # without replacement within an epoch


def test_each_epoch_resamples_and_the_seed_fixes_it():
    groups, counts = [list(range(100))], [20]
    s = MixtureSampler(groups, counts, seed=7)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and len(e0) == len(s) == 20
    again = MixtureSampler(groups, counts, seed=7)
    assert list(again) == e0
    assert list(MixtureSampler(groups, counts, seed=8)) != e0


def test_count_beyond_size_cycles_fresh_permutations():
    plan = epoch_plan([list(range(10))], [25], seed=0, epoch=0)
    c = Counter(plan)
    assert len(plan) == 25 and set(c) == set(range(10)) and max(c.values()) == 3
