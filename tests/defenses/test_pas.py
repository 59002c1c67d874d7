"""PAS: profiles, item splits, letter scorer, subject invariance, α chosen on validation items only."""

from __future__ import annotations

import pytest
import torch

from latentguard.defenses import build_defense
from latentguard.defenses.pas import (
    PAS_ITEMS,
    PasConfig,
    PasDefense,
    answers_from_profile,
    fit_pas,
    letter_scores,
    likert_error,
    pas_activations,
    split_items,
)
from latentguard.defenses.safetylock import lock_hooks
from latentguard.directions.heads import format_answers
from latentguard.errors import ConfigError
from latentguard.hooks import count_hooks
from latentguard.models import LoadedModel, model_info
from tests.conftest import build_tiny

S1 = "O=low,C=low,E=high,A=high,N=high"
S2 = "O=high,C=high,E=low,A=low,N=low"  # the exact opposite of S1
S3 = "O=low,C=low,E=low,A=high,N=high"  # S1 with E flipped


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer) -> LoadedModel:
    model = build_tiny("llama")
    return LoadedModel(model, tiny_tokenizer, model_info(model, "tiny"))


@pytest.fixture(scope="module")
def cfg() -> PasConfig:
    return PasConfig(k=3, alphas="0,2,8", batch_size=16, system="Be brief.")


@pytest.fixture(scope="module")
def acts(tiny, cfg):
    return pas_activations(tiny, split_items(PAS_ITEMS, cfg)[0], cfg)


def test_items_profile_and_split(cfg):
    assert len(PAS_ITEMS) == 40 and len({it.id for it in PAS_ITEMS}) == 40
    a1, a2 = answers_from_profile(S1), answers_from_profile(S2)
    assert all(a1[k] + a2[k] == 6 for k in a1)  # opposite subjects answer 5 vs 1 on every item
    assert a1["E1"] == 5 and a1["E5"] == 1 and a1["O1"] == 1
    extract, val, test = split_items(PAS_ITEMS, cfg)
    assert (len(extract), len(val), len(test)) == (20, 10, 10)
    assert not {i.id for i in extract} & {i.id for i in val} | {i.id for i in val} & {i.id for i in test}
    assert split_items(PAS_ITEMS, cfg) == (extract, val, test)  # seeded
    with pytest.raises(ConfigError, match="lacks"):
        answers_from_profile("O=high")
    with pytest.raises(ConfigError, match="both > 0 with a sum < 1"):
        PasConfig(extract_fraction=0.6, val_fraction=0.4)


def test_released_position_reads_identical_tokens_and_ours_does_not(tiny, cfg):
    """Negative control (pas.md §3): the code's `[:-5]` cut ends on the same template token for 'A' and 'E'."""
    tok = tiny.tokenizer
    ans = format_answers(tok, [("Q?", "A"), ("Q?", "E")], cfg.system)
    a, e = (tok(t, add_special_tokens=False)["input_ids"] for t in ans.texts)
    assert a[:-5] == e[:-5] and a != e
    letter = ans.n_prompt[0] + ans.n_answer[0] - 1
    assert a[letter] != e[letter] and tok.decode([a[letter]]) == "A"


def test_letter_scores_are_expected_likert_values(tiny, cfg):
    scores = letter_scores(tiny, PAS_ITEMS[:5], cfg)
    assert len(scores) == 5 and all(1.0 <= s <= 5.0 for s in scores)
    err = likert_error(PAS_ITEMS[:5], [5.0] * 5, answers_from_profile(S1))
    assert err["total"] == err["O"] == pytest.approx(sum(abs(5 - answers_from_profile(S1)[f"O{i}"]) for i in (1, 2, 3, 4, 5)) / 5)


def _signature(lock) -> tuple[list[tuple[int, int]], torch.Tensor]:
    heads = [(l, h) for l in sorted(lock.heads) for h in lock.heads[l].tolist()]
    return heads, torch.cat([lock.directions[l].flatten() for l in sorted(lock.heads)])


def test_opposite_subject_gets_the_same_heads_with_negated_directions(tiny, cfg, acts):
    r1 = fit_pas(tiny, answers_from_profile(S1), cfg, acts=acts, progress=False)
    r2 = fit_pas(tiny, answers_from_profile(S2), cfg, acts=acts, progress=False)
    r3 = fit_pas(tiny, answers_from_profile(S3), cfg, acts=acts, progress=False)
    heads1, u1 = _signature(r1.lock)
    heads2, u2 = _signature(r2.lock)
    heads3, u3 = _signature(r3.lock)
    assert heads1 == heads2 and torch.isfinite(u1).all()
    torch.testing.assert_close(u2, -u1)
    assert heads3 != heads1 or not torch.allclose(u3, u1)
    curve = r1.report["curve"]
    assert [c["alpha"] for c in curve] == [0.0, 2.0, 8.0]
    chosen = next(c for c in curve if c["alpha"] == r1.report["chosen_alpha"])
    assert chosen["val"]["total"] <= curve[0]["val"]["total"]  # chosen on validation items only
    assert r1.lock.default_alpha == r1.report["chosen_alpha"] and r1.lock.meta["method"] == "pas"
    assert count_hooks(tiny.model) == 0


def test_pas_lock_is_a_defence(tmp_path, tiny, cfg, acts):
    res = fit_pas(tiny, answers_from_profile(S1), cfg, acts=acts, progress=False)
    res.lock.save(tmp_path / "lock", tiny.info)
    d = build_defense(f"pas:{tmp_path / 'lock'},alpha=3", tiny)
    assert isinstance(d, PasDefense) and d.describe()["defense"] == "pas" and d.describe()["method"] == "pas"
    with d.apply(tiny.model):
        steered = letter_scores(tiny, PAS_ITEMS[:4], cfg)
    with lock_hooks(tiny.model, res.lock, 3.0):
        assert letter_scores(tiny, PAS_ITEMS[:4], cfg) == steered
    assert build_defense(str(tmp_path / "lock"), tiny).key == "pas"  # the lock names its defence
