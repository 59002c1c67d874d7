"""Baking `ablate` / `add` into weights reproduces the hooks; exports reload with plain from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from latentguard.artifacts import Artifact
from latentguard.defenses import apply_defenses, build_defense
from latentguard.defenses.bake import (
    EXPORT_META,
    export_model,
    fold_addition,
    orthogonalize_weights,
)
from latentguard.errors import ConfigError, UnsupportedModelError
from latentguard.hooks import add_vectors, count_hooks, encode_batch, project_out
from latentguard.models import LoadedModel, format_prompts, model_info
from tests.conftest import ARCH_NAMES, build_tiny

PROMPTS = [f"prompt number {i}: {'tell me about bread' if i % 2 else 'how to pick a lock'}" for i in range(20)]


def _loaded(arch: str, tok, seed: int = 0) -> LoadedModel:
    model = build_tiny(arch, seed)
    return LoadedModel(model, tok, model_info(model, f"tiny-{arch}"))


def _logits(model, tok, prompts=PROMPTS) -> torch.Tensor:
    batch = encode_batch(tok, format_prompts(tok, prompts))
    with torch.no_grad():
        return model(**batch.forward_kwargs(), use_cache=False).logits


def _direction(d: int, seed: int = 7) -> torch.Tensor:
    return 3.0 * torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _artefact(tmp_path, loaded: LoadedModel, layer: int = 1) -> str:
    d = loaded.info.d_model
    Artifact("refusal_direction", {"direction": _direction(d)}, {"layer": layer, "defense": "ablate"}).save(
        tmp_path / "rd", model=loaded.info)
    return str(tmp_path / "rd")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_orthogonalised_weights_reproduce_ablation_hooks(arch, tiny_tokenizer):
    model = build_tiny(arch)
    r = _direction(model.config.get_text_config().hidden_size)
    with project_out(model, r):
        hooked = _logits(model, tiny_tokenizer)
    plain = _logits(model, tiny_tokenizer)
    edited = orthogonalize_weights(model, r)
    baked = _logits(model, tiny_tokenizer)
    assert (hooked - plain).abs().max() > 1e-3  # the direction matters
    torch.testing.assert_close(baked, hooked, atol=1e-5, rtol=0)
    assert len(edited) == 2 * 2 + (2 if arch == "gpt2" else 1)  # o_proj + down_proj per layer, embeddings
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_folded_bias_reproduces_addition_hook(arch, tiny_tokenizer):
    model = build_tiny(arch)
    r = _direction(model.config.get_text_config().hidden_size)
    with add_vectors(model, {"resid_pre.1": r}, alpha=2.5):
        hooked = _logits(model, tiny_tokenizer)
    fold_addition(model, r, layer=1, alpha=2.5)
    torch.testing.assert_close(_logits(model, tiny_tokenizer), hooked, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="layer 0 has no block before it"):
        fold_addition(model, r, layer=0, alpha=1.0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_export_ablate_reloads_with_from_pretrained(arch, tmp_path, tiny_tokenizer):
    loaded = _loaded(arch, tiny_tokenizer)
    (defense,) = [build_defense(f"ablate:{_artefact(tmp_path, loaded)}", loaded)]
    with apply_defenses(loaded.model, [defense]):
        hooked = _logits(loaded.model, tiny_tokenizer)
    out = export_model(loaded, [defense], tmp_path / "export", prompts=PROMPTS, tolerance=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, tiny_tokenizer), hooked, atol=1e-5, rtol=0)
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["verify"]["max_abs_logit_diff"] <= 1e-5 and meta["verify"]["n_prompts"] == 20
    assert meta["baked"]["defense"] == "ablate" and count_hooks(loaded.model) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_add_enables_bias_and_reloads(arch, tmp_path, tiny_tokenizer):
    loaded = _loaded(arch, tiny_tokenizer)
    defense = build_defense(f"add:{_artefact(tmp_path, loaded)},alpha=2", loaded)
    with apply_defenses(loaded.model, [defense]):
        hooked = _logits(loaded.model, tiny_tokenizer)
    out = export_model(loaded, [defense], tmp_path / "export", prompts=PROMPTS, tolerance=1e-5)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(reloaded.eval(), tiny_tokenizer), hooked, atol=1e-5, rtol=0)
    if arch == "llama":
        assert reloaded.config.mlp_bias is True
        assert reloaded.model.layers[1].mlp.down_proj.bias.abs().max() == 0  # zero elsewhere
        torch.testing.assert_close(reloaded.model.layers[0].mlp.down_proj.bias, 2 * _direction(64))


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma"])
def test_export_add_without_bias_flag_is_refused(arch, tmp_path, tiny_tokenizer):
    loaded = _loaded(arch, tiny_tokenizer)
    defense = build_defense(f"add:{_artefact(tmp_path, loaded)}", loaded)
    with pytest.raises(UnsupportedModelError, match=f"{arch} has no config flag that creates a down_proj bias"):
        export_model(loaded, [defense], tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_refuses_conditional_and_several_defences(tmp_path, tiny_tokenizer):
    loaded = _loaded("llama", tiny_tokenizer)
    art = _artefact(tmp_path, loaded)
    cond = build_defense(f"conditional:{art},threshold=0.2", loaded)
    with pytest.raises(ConfigError, match="`conditional` cannot be baked into weights"):
        export_model(loaded, [cond], tmp_path / "export")
    two = [build_defense(f"ablate:{art}", loaded), build_defense(f"add:{art}", loaded)]
    with pytest.raises(ConfigError, match="export bakes exactly one"):
        export_model(loaded, two, tmp_path / "export")
    assert not (tmp_path / "export").exists()
