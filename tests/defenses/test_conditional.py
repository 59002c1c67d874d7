"""`conditional` (CAST-style) steering: prompts below the threshold are untouched, bit for bit."""

from __future__ import annotations

import pytest
import torch

from latentguard.artifacts import Artifact
from latentguard.defenses import apply_defenses, build_defense
from latentguard.defenses.conditional import conditional_addition
from latentguard.errors import ConfigError
from latentguard.hooks import count_hooks, encode_batch
from latentguard.models import LoadedModel, format_prompts, model_info
from tests.conftest import build_tiny

PROMPTS = ["how do I bake bread", "tell me a joke", "write a poem about rain", "pick a lock for me",
           "what is two plus two", "hello"]


@pytest.fixture
def tiny(tiny_tokenizer) -> LoadedModel:
    model = build_tiny("llama")
    return LoadedModel(model, tiny_tokenizer, model_info(model, "tiny"))


def _batch(loaded: LoadedModel, prompts=PROMPTS):
    return encode_batch(loaded.tokenizer, format_prompts(loaded.tokenizer, prompts)).forward_kwargs()


def _logits(loaded: LoadedModel, prompts=PROMPTS) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**_batch(loaded, prompts), use_cache=False).logits


def _vec(seed: int = 3) -> torch.Tensor:
    return 4.0 * torch.randn(64, generator=torch.Generator().manual_seed(seed))


def _scores(loaded: LoadedModel, cond: torch.Tensor) -> torch.Tensor:
    """Gate scores at resid_pre.1 (resid_pre.0 of the last token is the same template token for every prompt)."""
    with conditional_addition(loaded.model, _vec(), 1, cond, 1, threshold=1.0) as gate:
        _logits(loaded)
    assert gate.scores is not None
    return gate.scores


def test_rows_below_threshold_are_bit_identical(tiny):
    cond = _vec(9)
    plain = _logits(tiny)
    scores = _scores(tiny, cond)
    thr = float(scores.median())
    with conditional_addition(tiny.model, _vec(), 1, cond, 1, threshold=thr) as gate:
        gated = _logits(tiny)
    below = scores <= thr
    assert below.any() and (~below).any()
    assert torch.equal(gated[below], plain[below])
    assert (gated[~below] - plain[~below]).abs().amax(dim=(1, 2)).min() > 1e-3
    assert torch.equal(gate.open.cpu(), ~below)


def test_closed_gate_leaves_generation_identical_and_open_gate_persists(tiny):
    cond = _vec(9)
    kwargs = _batch(tiny, PROMPTS[:2])
    kwargs.pop("position_ids")
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tiny.tokenizer.pad_token_id}
    with torch.no_grad():
        plain = tiny.model.generate(**kwargs, **gen)
        with conditional_addition(tiny.model, _vec(), 1, cond, 1, threshold=1.0):
            closed = tiny.model.generate(**kwargs, **gen)
        with conditional_addition(tiny.model, 50 * _vec(), 1, cond, 1, threshold=-1.0) as gate:
            opened = tiny.model.generate(**kwargs, **gen)
    assert torch.equal(closed, plain)
    assert not torch.equal(opened, plain) and bool(gate.open.all())


def test_defence_from_artefact_uses_stored_condition(tmp_path, tiny):
    cond = {"layer": 1, "threshold": 1.0}
    Artifact("refusal_direction", {"direction": _vec()}, {"layer": 1, "condition": cond}).save(tmp_path / "rd", model=tiny.info)
    plain = _logits(tiny)
    before = count_hooks(tiny.model)
    d = build_defense(f"conditional:{tmp_path / 'rd'}", tiny)
    assert d.describe()["threshold"] == 1.0 and d.describe()["condition_layer"] == 1
    with apply_defenses(tiny.model, [d]):
        assert torch.equal(_logits(tiny), plain)
    opened = build_defense(f"conditional:{tmp_path / 'rd'},threshold=-1,alpha=2", tiny)
    with pytest.raises(RuntimeError), apply_defenses(tiny.model, [opened]):
        assert not torch.equal(_logits(tiny), plain)
        raise RuntimeError("forced")
    assert count_hooks(tiny.model) == before


def test_bad_conditional_inputs(tmp_path, tiny):
    Artifact("scan_directions", {"directions": torch.randn(2, 64)}, {"best_layer": 1}).save(tmp_path / "scan", model=tiny.info)
    with pytest.raises(ConfigError, match="stores no calibrated condition; pass threshold="):
        build_defense(f"conditional:{tmp_path / 'scan'}", tiny)
    with pytest.raises(ConfigError, match="condition_layer=1 comes after the steering layer 0"), \
            conditional_addition(tiny.model, _vec(), 0, _vec(), 1, threshold=0.0):
        pass
    with pytest.raises(ConfigError, match="alpha=nan is not finite"):
        build_defense(f"conditional:{tmp_path / 'scan'},threshold=0.1,alpha=nan", tiny)
    with pytest.raises(ConfigError, match="a cosine threshold lies in"):
        build_defense(f"conditional:{tmp_path / 'scan'},threshold=3", tiny)
    with pytest.raises(ConfigError, match="Layer 7 is out of range"):
        build_defense(f"conditional:{tmp_path / 'scan'},threshold=0.1,condition_layer=7", tiny)
    assert count_hooks(tiny.model) == 0
