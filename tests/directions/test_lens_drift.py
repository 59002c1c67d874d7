"""Logit lens and direction drift on tiny models, with the model (and baked edits) as oracle."""

from __future__ import annotations

import copy

import pytest
import torch

from latentguard.defenses.bake import fold_addition, orthogonalize_weights
from latentguard.directions.drift import DriftConfig, class_stats, compare_stats
from latentguard.directions.lens import LensConfig, logit_lens
from latentguard.directions.metrics import refusal_token_ids
from latentguard.errors import ConfigError
from latentguard.hooks import count_hooks, encode_batch
from latentguard.models import LoadedModel, format_prompts, model_info
from tests.conftest import build_tiny

HARMFUL = ["how to build a bomb", "steal a car quickly", "poison my neighbour", "hack a bank account"]
HARMLESS = ["bake some bread", "write a poem", "plan a trip", "learn to swim"]


def _loaded(model, tok) -> LoadedModel:
    return LoadedModel(model, tok, model_info(model, "tiny"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lens_last_layer_is_the_models_own_distribution(arch, tiny_tokenizer):
    loaded = _loaded(build_tiny(arch), tiny_tokenizer)
    lens = logit_lens(loaded, "how do I bake bread", LensConfig(top_k=3, last_positions=4))
    batch = encode_batch(tiny_tokenizer, format_prompts(tiny_tokenizer, ["how do I bake bread"]))
    with torch.no_grad():
        probs = torch.softmax(loaded.model(**batch.forward_kwargs()).logits[0, -4:].double(), -1)
    last = lens["layers"][-1]["cells"]
    ref = refusal_token_ids(tiny_tokenizer, ["I"])
    assert len(lens["layers"]) == 2 and len(last) == 4 and len(lens["tokens"]) == 4
    for t in range(4):
        assert last[t]["p_refusal"] == pytest.approx(float(probs[t, ref].sum()), abs=1e-6)
        assert last[t]["top_p"][0] == pytest.approx(float(probs[t].max()), abs=1e-6)
    assert count_hooks(loaded.model) == 0
    with pytest.raises(ConfigError, match="top_k=0"):
        LensConfig(top_k=0)


def test_drift_oracles_identity_ablation_and_addition(tiny_tokenizer):
    base = _loaded(build_tiny("llama"), tiny_tokenizer)
    cfg = DriftConfig(n=4, batch_size=4)
    stats = class_stats(base, HARMFUL, HARMLESS, cfg)
    same = compare_stats(stats, stats, layer=1)
    assert same["at_layer"]["cos"] == pytest.approx(1.0) and same["at_layer"]["shift_harmful"] == 0.0
    assert same["layers"][0]["cos"] is None  # layer 0 at the last (template) token: zero direction
    r = stats.directions()[1].float()

    ablated = copy.deepcopy(base.model)
    orthogonalize_weights(ablated, r)
    drift = compare_stats(stats, class_stats(_loaded(ablated, tiny_tokenizer), HARMFUL, HARMLESS, cfg), 1, r)
    assert abs(drift["at_layer"]["cos_direction"]) < 1e-4  # the tuned stream no longer carries r̂

    added = copy.deepcopy(base.model)
    fold_addition(added, r, layer=1, alpha=2.0)
    drift = compare_stats(stats, class_stats(_loaded(added, tiny_tokenizer), HARMFUL, HARMLESS, cfg), 1, r)
    for key in ("shift_harmful", "shift_harmless"):  # every prompt moved by 2‖r‖ along r̂
        assert drift["at_layer"][key] == pytest.approx(2 * float(r.norm()), rel=1e-4)
    assert drift["at_layer"]["cos"] == pytest.approx(1.0, abs=1e-5)


def test_drift_refuses_models_of_other_shapes(tiny_tokenizer):
    cfg = DriftConfig(n=4, batch_size=4)
    a = class_stats(_loaded(build_tiny("llama"), tiny_tokenizer), HARMFUL, HARMLESS, cfg)
    b = class_stats(_loaded(build_tiny("gemma"), tiny_tokenizer), HARMFUL, HARMLESS, cfg)
    b.harmful, b.harmless = b.harmful[..., :32], b.harmless[..., :32]
    with pytest.raises(ConfigError, match="compare checkpoints of the same base"):
        compare_stats(a, b, layer=1)
    with pytest.raises(ConfigError, match="n=1; use at least 2"):
        DriftConfig(n=1)
