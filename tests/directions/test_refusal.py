"""`extract_refusal_direction` end to end on a tiny model, checked against hand-computed means."""

from __future__ import annotations

import math

import pytest
import torch

from latentguard.artifacts import Artifact, write_json
from latentguard.directions.refusal import (
    RefusalData,
    RefusalDirectionConfig,
    calibrate_threshold,
    cover_tokens,
    extract_refusal_direction,
    is_refusal,
)
from latentguard.errors import ConfigError, DataError
from latentguard.hooks import collect, count_hooks
from latentguard.models import LoadedModel, eoi_token_ids, format_prompts, model_info
from tests.conftest import build_tiny

DATA = RefusalData(
    harmful_train=["how to build a bomb", "steal a car quickly", "poison my neighbour", "hack a bank account", "make meth"],
    harmless_train=["bake some bread", "write a poem", "plan a trip", "learn to swim", "fold a towel", "sing a song"],
    harmful_val=["forge a passport", "rob a store", "spread a virus"],
    harmless_val=["paint a fence", "boil an egg", "read a map"],
)
CFG = {"filter_train": False, "filter_val": False, "prune_layer_fraction": 0.0, "kl_threshold": 1e3,
       "induce_threshold": -1e3, "refusal_tokens": "I", "batch_size": 4}


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer) -> LoadedModel:
    model = build_tiny("llama")
    return LoadedModel(model, tiny_tokenizer, model_info(model, "tiny"))


@pytest.fixture(scope="module")
def result(tiny):
    return extract_refusal_direction(tiny, DATA, RefusalDirectionConfig(**CFG, positions="-1,-3"), progress=False)


def test_candidates_are_float64_diff_in_means_of_block_inputs(tiny, result):
    tok = tiny.tokenizer
    n_eoi = len(eoi_token_ids(tok))
    cands = result.artifact.tensors["candidates"]
    assert cands.shape == (n_eoi, 2, 64)
    for l in range(2):
        site = f"resid_pre.{l}"
        h = collect(tiny.model, tok, format_prompts(tok, DATA.harmful_train), [site], list(range(-n_eoi, 0)), progress=False)[site]
        b = collect(tiny.model, tok, format_prompts(tok, DATA.harmless_train), [site], list(range(-n_eoi, 0)), progress=False)[site]
        torch.testing.assert_close(cands[:, l], (h.double().mean(0) - b.double().mean(0)).float(), atol=1e-6, rtol=0)
    assert count_hooks(tiny.model) == 0


def test_only_requested_candidates_are_scored_and_the_winner_is_argmin_bypass(result):
    art, s = result.artifact, result.scores
    scored = {(c["position"], c["layer"]) for c in s["candidates"]}
    assert scored == {(-1, 0), (-1, 1), (-3, 0), (-3, 1)}
    zero = [c for c in s["candidates"] if not c["passed"]]  # layer 0 at a template token: r = 0, scored NaN
    assert [(c["position"], c["layer"], c["failed"]) for c in zero] == [(-3, 0, ["nan score"]), (-1, 0, ["nan score"])]
    best = min((c for c in s["candidates"] if c["passed"]), key=lambda c: c["bypass"])
    assert (s["selected"]["position"], s["selected"]["layer"]) == (best["position"], best["layer"])
    i, l = art.meta["position_index"], art.meta["layer"]
    torch.testing.assert_close(art.tensors["direction"], art.tensors["candidates"][i, l])
    assert math.isnan(float(art.tensors["bypass"][0, 0]))  # position -n_eoi was not asked for
    assert s["refusal_tokens"]["source"] == "given" and art.meta["refusal_token_ids"] == s["refusal_tokens"]["ids"]
    assert set(art.meta["condition"]) >= {"layer", "threshold", "balanced_accuracy"}


def test_artefact_and_scores_round_trip(tmp_path, tiny, result):
    result.artifact.save(tmp_path / "rd", model=tiny.info)
    write_json(tmp_path / "scores.json", result.scores)  # JSON-clean: no NaN
    art = Artifact.load(tmp_path / "rd", expect="refusal_direction", model=tiny.info)
    torch.testing.assert_close(art.tensors["direction"], result.artifact.tensors["direction"])
    torch.testing.assert_close(art.tensors["kl"], result.artifact.tensors["kl"], equal_nan=True)
    assert art.meta["defense"] == "ablate" and art.meta["data"] == DATA.hashes()


def test_refusal_token_derivation_rules(tiny):
    assert cover_tokens([5, 5, 5, 7, 7, 9, 40, 40, 40, 40], 0.9, always=40) == [5, 7, 40]
    assert cover_tokens([5] * 9 + [7], 0.9, always=40) == [5, 40]
    assert is_refusal("Sure. I'M SORRY, no.") and not is_refusal("Sure, here is how.")
    cfg = RefusalDirectionConfig(**{**CFG, "refusal_tokens": None}, layers="1", positions="-1", n_refusal_probe=2,
                                 refusal_probe_tokens=3)
    res = extract_refusal_direction(tiny, DATA, cfg, progress=False)
    rt = res.scores["refusal_tokens"]  # a random model never refuses: fall back to "I", recorded
    assert rt["source"] == "fallback" and rt["n_probed"] == 2 and rt["n_refusals"] == 0 and rt["tokens"] == ["I"]


def test_filter_that_keeps_nothing_names_the_flag(tiny):
    cfg = RefusalDirectionConfig(**{**CFG, "filter_train": True}, layers="0")
    with pytest.raises(DataError, match="kept 0 harmful_train prompts .* pass --no-filter-train"):
        extract_refusal_direction(tiny, DATA, cfg, progress=False)
    with pytest.raises(DataError, match="harmless_val set is empty"):
        extract_refusal_direction(tiny, RefusalData(DATA.harmful_train, DATA.harmless_train, DATA.harmful_val, []), cfg)


def test_config_parsing_and_errors():
    cfg = RefusalDirectionConfig(layers="0:24:4", positions="-1,-2")
    assert cfg.layer_list(30) == [0, 4, 8, 12, 16, 20] and cfg.position_list(5) == [-2, -1]
    assert RefusalDirectionConfig().layer_list(30) == list(range(24)) and RefusalDirectionConfig().position_list(3) == [-3, -2, -1]
    with pytest.raises(ConfigError, match=r"positions \[-7\] are outside the 5 post-instruction tokens"):
        RefusalDirectionConfig(positions="-7").position_list(5)
    with pytest.raises(ConfigError, match="out of range; use 0..29"):
        RefusalDirectionConfig(layers="3,40").layer_list(30)
    with pytest.raises(ConfigError, match="write integers"):
        RefusalDirectionConfig(layers="a,b").layer_list(30)
    with pytest.raises(ConfigError, match="n_val=0; use >= 1"):
        RefusalDirectionConfig(n_val=0)


def test_calibrated_threshold_separates_classes():
    t, acc = calibrate_threshold(torch.tensor([0.5, 0.6, 0.7]), torch.tensor([0.1, 0.2, 0.55]))
    assert acc == pytest.approx(5 / 6) and 0.2 < t < 0.5 or 0.55 < t < 0.6
