"""Model-transform attacks on tiny real models: `harmful-ft` swaps fine-tuned weights in and restores
them (also after a forced error) and refuses another model's fine-tune; `ablate` removes the
direction and leaves no hooks."""

from __future__ import annotations

import json

import pytest
import torch

from latentguard.artifacts import Artifact
from latentguard.attacks import AttackContext, build_attack
from latentguard.attacks.harmful_ft import swap_weights
from latentguard.errors import ArtifactError
from latentguard.hooks import capture, count_hooks, encode_batch
from latentguard.models import LoadedModel, fingerprint, format_prompts, model_info
from tests.conftest import build_tiny


def _loaded(model, tok) -> LoadedModel:
    return LoadedModel(model, tok, model_info(model, "tiny"))


def _finetune_dir(tmp_path, tok, base, name="ft"):
    """A 'fine-tune' of `base`: perturbed weights saved as a merged checkpoint naming its base."""
    ft = build_tiny("llama")
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        ft.model.layers[0].mlp.down_proj.weight.add_(0.5)
    ft.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    (tmp_path / name / "latentguard.json").write_text(json.dumps({"base_model": model_info(base, "tiny").as_meta()}))
    return tmp_path / name, ft


def _logits(loaded: LoadedModel) -> torch.Tensor:
    b = encode_batch(loaded.tokenizer, format_prompts(loaded.tokenizer, ["Hello there.", "Plant a tree."]))
    with torch.no_grad():
        return loaded.model(**b.forward_kwargs()).logits


def test_harmful_ft_swaps_weights_in_and_restores_them(tmp_path, tiny_llama, tiny_tokenizer):
    loaded = _loaded(tiny_llama, tiny_tokenizer)
    path, ft = _finetune_dir(tmp_path, tiny_tokenizer, tiny_llama)
    before, fp = _logits(loaded), fingerprint(tiny_llama)
    attack = build_attack(f"harmful-ft:{path}", AttackContext(loaded))
    assert attack.describe()["source"] == "merged" and attack.describe()["finetune_fingerprint"] == fingerprint(ft)
    with attack.apply(loaded.model):
        assert fingerprint(loaded.model) == fingerprint(ft)
        assert (_logits(loaded) - _logits(_loaded(ft, tiny_tokenizer))).abs().max() < 1e-6
    assert torch.equal(_logits(loaded), before) and fingerprint(loaded.model) == fp
    with pytest.raises(RuntimeError, match="boom"), attack.apply(loaded.model):
        raise RuntimeError("boom")
    assert fingerprint(loaded.model) == fp and count_hooks(loaded.model) == 0


def test_harmful_ft_refuses_another_models_finetune(tmp_path, tiny_tokenizer):
    other = build_tiny("llama", seed=5)
    path, _ = _finetune_dir(tmp_path, tiny_tokenizer, other)
    loaded = _loaded(build_tiny("llama"), tiny_tokenizer)
    with pytest.raises(ArtifactError, match="was fine-tuned from fingerprint .* add allow_other_base=1"):
        build_attack(f"harmful-ft:{path}", AttackContext(loaded))
    attack = build_attack(f"harmful-ft:{path},allow_other_base=1", AttackContext(loaded))
    assert attack.describe()["config"] == {"allow_other_base": True}
    with pytest.raises(ArtifactError, match="is not a fine-tuned model"):
        build_attack(f"harmful-ft:{tmp_path}", AttackContext(loaded))


def test_swap_weights_restores_a_half_done_swap(tiny_llama):
    names = [n for n, _ in tiny_llama.named_parameters()]
    fp = fingerprint(tiny_llama)
    partial = {n: torch.zeros_like(p) for n, p in tiny_llama.named_parameters() if n != names[-1]}
    with pytest.raises(KeyError), swap_weights(tiny_llama, partial):
        pass
    assert fingerprint(tiny_llama) == fp


def test_ablate_attack_removes_the_direction_and_its_hooks(tmp_path, tiny_llama, tiny_tokenizer):
    loaded = _loaded(tiny_llama, tiny_tokenizer)
    d = torch.randn(64, generator=torch.Generator().manual_seed(0))
    Artifact("refusal_direction", {"direction": d}, {"layer": 1}).save(tmp_path / "dir", model=loaded.info)
    attack = build_attack(f"ablate:{tmp_path / 'dir'}", AttackContext(loaded))
    assert attack.describe()["layer"] == 1 and attack.family == "model" and not attack.changes_prompts
    b = encode_batch(tiny_tokenizer, format_prompts(tiny_tokenizer, ["Hello there."]))
    unit = d / d.norm()
    with attack.apply(loaded.model), capture(loaded.model, ["resid_post.1"]) as rec, torch.no_grad():
        loaded.model(**b.forward_kwargs())
    assert (rec["resid_post.1"][0] @ unit).abs().max() < 1e-4
    assert count_hooks(loaded.model) == 0
