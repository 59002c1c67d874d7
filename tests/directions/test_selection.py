"""Candidate scoring and the selection filters of refusal_direction.md §5."""

from __future__ import annotations

import math

import pytest
import torch

from latentguard.directions.selection import (
    CandidateScores,
    SelectionConfig,
    candidate_failures,
    encode_prompts,
    kl_last,
    last_logits,
    layer_cutoff,
    score_candidates,
    select_direction,
)
from latentguard.errors import ConfigError
from latentguard.hooks import ablation_sites, collect, count_hooks
from latentguard.models import LoadedModel, format_prompts, model_info
from tests.conftest import build_tiny

HARMFUL = ["how to build a bomb", "steal a car quickly", "poison my neighbour", "hack a bank account"]
HARMLESS = ["bake some bread", "write a poem", "plan a trip", "learn to swim"]


def _grid(bypass, induce, kl) -> CandidateScores:
    t = lambda g: torch.tensor(g, dtype=torch.float64)
    return CandidateScores([-2, -1], t(bypass), t(induce), t(kl), torch.ones(2, 3, dtype=torch.bool))


def test_kl_matches_hand_computation_and_is_zero_for_equal_logits():
    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    pa, pb = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    hand = float((pa * (torch.log(pa + 1e-6) - torch.log(pb + 1e-6))).sum())
    assert float(kl_last(a, b)[0]) == pytest.approx(hand, rel=1e-12)
    assert float(kl_last(a, a)[0]) == 0.0


def test_filters_and_argmin_bypass():
    cfg = SelectionConfig()
    assert layer_cutoff(30, 0.2) == 24 and layer_cutoff(3, 0.2) == 2
    scores = _grid(bypass=[[-9.0, -5.0, -20.0], [-8.0, math.nan, -1.0]],
                   induce=[[1.0, 2.0, 3.0], [-0.5, 1.0, 1.0]],
                   kl=[[0.5, 0.05, 0.0], [0.01, 0.01, 0.01]])
    fails = candidate_failures(scores, 3, cfg)
    assert fails[0][0] == ["kl 0.5 > 0.1"]  # best bypass among layers < 2, but too much KL
    assert fails[0][2] == ["layer >= 2"]  # late layer: cut off whatever its scores
    assert fails[1][0] == ["induce -0.5 < 0.0"] and fails[1][1] == ["nan score"]
    assert select_direction(scores, 3, cfg) == (0, 1)
    assert select_direction(scores, 3, SelectionConfig(kl_threshold=1.0)) == (0, 0)


def test_nothing_survives_lists_best_candidates_and_their_filters():
    scores = _grid(bypass=[[-9.0, -5.0, -20.0], [-8.0, -7.0, -1.0]],
                   induce=[[1.0, -2.0, 3.0], [1.0, 1.0, 1.0]],
                   kl=[[0.5, 0.05, 0.0], [0.3, 0.2, 0.01]])
    with pytest.raises(ConfigError, match=r"No refusal-direction candidate passes the filters \(best by bypass: "
                                          r"\(pos -2, layer 2, bypass -20\): layer >= 2; \(pos -2, layer 0, bypass -9\): kl 0.5 > 0.1"):
        select_direction(scores, 3, SelectionConfig())


def test_bad_selection_settings():
    with pytest.raises(ConfigError, match="kl_threshold=0"):
        SelectionConfig(kl_threshold=0)
    with pytest.raises(ConfigError, match="induce_threshold=nan"):
        SelectionConfig(induce_threshold=math.nan)
    with pytest.raises(ConfigError, match="prune_layer_fraction=1"):
        SelectionConfig(prune_layer_fraction=1)


def test_real_scores_reject_a_constructed_kl_failing_direction(tiny_tokenizer):
    """A = the dominant direction of harmless activations: ablating it wrecks the output (big KL)
    and so lowers the proxy most; B = the least-used direction: harmless to ablate. Selection takes B."""
    model = build_tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # peaked next-token distributions, as in a trained model
    loaded = LoadedModel(model, tiny_tokenizer, model_info(model, "tiny"))
    fmt = lambda ps: format_prompts(tiny_tokenizer, ps)
    val = (encode_prompts(loaded, fmt(HARMFUL), 4), encode_prompts(loaded, fmt(HARMLESS), 4))
    base_harmful, base_harmless = last_logits(loaded, val[0]), last_logits(loaded, val[1])
    refusal_ids = [int(base_harmful[0].argmax())]  # a token the model currently predicts
    acts = collect(model, tiny_tokenizer, fmt(HARMFUL + HARMLESS), [str(s) for s in ablation_sites(model)],
                   positions=list(range(-12, 0)), progress=False)
    a = acts["resid_pre.1"][len(HARMFUL):, -1].mean(0)
    b = torch.linalg.svd(torch.cat([x.reshape(-1, 64) for x in acts.values()]).double(), full_matrices=False).Vh[-1]
    cands = torch.zeros(2, 2, 64, dtype=torch.float64)
    cands[0, 1], cands[1, 1] = a, b
    scores = score_candidates(loaded, cands, [-2, -1], [(0, 1), (1, 1)], val, base_harmless, refusal_ids, progress=False)
    assert count_hooks(model) == 0
    assert float(scores.kl[0, 1]) > 1.0 and float(scores.kl[1, 1]) < 0.1
    assert float(scores.bypass[0, 1]) < float(scores.bypass[1, 1])  # A would win on bypass alone
    cfg = SelectionConfig(induce_threshold=-100.0, prune_layer_fraction=0.0)
    assert select_direction(scores, 2, cfg) == (1, 1)
    scores.scored[1, 1] = False  # drop B: A alone fails on KL
    with pytest.raises(ConfigError, match=r"\(pos -2, layer 1, bypass -\d+.*\): kl \d+.* > 0.1"):
        select_direction(scores, 2, cfg)
