"""Sparse autoencoders on the tiny Llama: training lowers the reconstruction error, top-k keeps
exactly k latents, the encoders match hand-computed values, pooling ignores prompt and padding,
artefacts and the SAELens / npz layouts round-trip, and a wrong model or site is refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentguard.directions.sae import SAEMeta, SparseAutoencoder, load_sae, pool_codes
from latentguard.directions.sae_train import (
    SAETrainConfig,
    build_sae,
    evaluate_sae,
    train_sae,
    write_shards,
)
from latentguard.errors import ArtifactError, ConfigError
from latentguard.models import LoadedModel, model_info
from tests.conftest import build_tiny

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "ran", "fast", "slow", "red", "blue", "green", "apple", "tree", "house", "river", "stone"]


def _pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    g = np.random.default_rng(seed)
    return [(" ".join(g.choice(WORDS, 4)), " ".join(g.choice(WORDS, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_tokenizer) -> LoadedModel:
    model = build_tiny("llama")
    return LoadedModel(model, tiny_tokenizer, model_info(model, "tiny"))


@pytest.fixture(scope="module")
def shards(tiny_loaded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("acts")
    return write_shards(tiny_loaded, _pairs(120), "resid_post.1", folder, max_tokens=4000, shard_tokens=1500)


def _random_sae(d: int = 64, m: int = 96, **meta: object) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, m, SAEMeta(site="resid_post.1", **meta))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_training_lowers_the_reconstruction_error(shards, arch):
    cfg = SAETrainConfig(layer=1, architecture=arch, width=128, k=8, epochs=3, batch_tokens=256)
    untrained, _ = train_sae(shards, "resid_post.1", dataclasses.replace(cfg, epochs=1, lr=0.0))
    trained, history = train_sae(shards, "resid_post.1", cfg)
    before, after = evaluate_sae(untrained, shards), evaluate_sae(trained, shards)
    assert after["fvu"] < 0.5 * before["fvu"]
    assert history[-1]["mse_per_dim"] < history[0]["mse_per_dim"]


def test_topk_keeps_exactly_k_latents_on_real_activations(shards):
    sae, _ = train_sae(shards, "resid_post.1", SAETrainConfig(layer=1, width=128, k=8, epochs=1, batch_tokens=256))
    x = load_file(str(shards[0]))["x"].float()
    active = (sae.encode(x) > 0).sum(-1)
    assert torch.equal(active, torch.full_like(active, 8))


def test_topk_and_jumprelu_match_hand_computed_values():
    sae = SparseAutoencoder(2, 3, SAEMeta(site="resid_post.0", architecture="topk", k=2, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 3.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5, -0.5]))
    x = torch.tensor([[1.0, 1.0]])  # pre = [1.5, 2.5, 0.5]
    assert torch.allclose(sae.encode(x), torch.tensor([[1.5, 2.5, 0.0]]))
    jump = SparseAutoencoder(2, 3, SAEMeta(site="resid_post.0", architecture="jumprelu", k=None, apply_b_dec_to_input=False))
    with torch.no_grad():
        jump.W_enc.copy_(sae.W_enc)
        jump.b_enc.copy_(sae.b_enc)
        jump.threshold.copy_(torch.tensor([2.0, 2.0, 0.1]))
    assert torch.allclose(jump.encode(x), torch.tensor([[0.0, 2.5, 0.5]]))


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_folding_the_input_scale_keeps_the_reconstruction(arch):
    sae = _random_sae(architecture=arch, k=8 if arch == "topk" else None, input_scale=7.0)
    x = torch.randn(5, 64) * 7
    x_hat, c = sae(x)
    folded = SparseAutoencoder.from_tensors(sae.tensors(), dataclasses.replace(sae.meta, extra={})).fold_input_scale_()
    x_hat2, c2 = folded(x)
    assert folded.meta.input_scale == 1.0 and folded.meta.extra["folded_input_scale"] == 7.0
    assert torch.allclose(x_hat2, x_hat, rtol=1e-5, atol=1e-3) and torch.allclose(c2, 7 * c, rtol=1e-5, atol=1e-3)


def test_pooling_ignores_prompt_and_pad_tokens():
    sae = _random_sae(architecture="relu", k=None)
    hidden = torch.randn(2, 5, 64)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    garbage = torch.where(mask.bool().unsqueeze(-1), hidden, torch.randn(2, 5, 64) * 100)
    expect = torch.stack([sae.encode(hidden[0, 2:4]).mean(0), sae.encode(hidden[1, 1:]).mean(0)])
    assert torch.allclose(pool_codes(sae, garbage, mask), expect, atol=1e-5)


def test_build_writes_an_artefact_that_round_trips(tiny_loaded, tmp_path):
    cfg = SAETrainConfig(layer=-1, width=96, k=4, epochs=1, max_tokens=1500, shard_tokens=600, splice_pairs=4)
    out = build_sae(tiny_loaded, _pairs(40), cfg, tmp_path / "sae")
    sae = load_sae(out, model=tiny_loaded.info)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "sae" and meta["site"] == "resid_post.1"
    assert meta["input_scale"] == 1.0 and meta["folded_input_scale"] > 0  # codes in activation units
    assert {"fvu", "l0", "dead_fraction"} <= set(meta["eval"]["heldout"]) and "ce_increase" in meta["eval"]["splice"]
    assert not (out / "activations").exists()
    assert sae.d_sae == 96 and sae.meta.k == 4 and not sae.W_enc.requires_grad


def test_artefact_saelens_and_npz_layouts_load(tmp_path):
    ref = _random_sae(architecture="jumprelu", k=None, apply_b_dec_to_input=False)
    tensors = ref.tensors()
    ref.to_artifact().save(tmp_path / "artefact")
    folder = tmp_path / "saelens"
    folder.mkdir()
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 64, "d_sae": 96,
                                                 "hook_name": "blocks.1.hook_resid_post", "apply_b_dec_to_input": False,
                                                 "normalize_activations": "none"}))
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in tensors.items()})
    x = torch.randn(4, 64)
    for sae in (load_sae(tmp_path / "artefact"), load_sae(folder), load_sae(tmp_path / "params.npz", site="resid_post.1")):
        assert str(sae.site) == "resid_post.1" and sae.meta.architecture == "jumprelu"
        assert torch.allclose(sae.encode(x), ref.encode(x), atol=1e-5)
    with pytest.raises(ArtifactError, match="carries no metadata; name the site"):
        load_sae(tmp_path / "params.npz")
    (folder / "cfg.json").write_text(json.dumps({"architecture": "gated", "hook_name": "blocks.1.hook_resid_post"}))
    with pytest.raises(ArtifactError, match="architecture 'gated' is not supported"):
        load_sae(folder)


def test_an_sae_of_another_model_is_refused(tiny_loaded, tmp_path):
    other = build_tiny("llama", seed=1)
    _random_sae().to_artifact().save(tmp_path / "sae", model=model_info(other, "other"))
    with pytest.raises(ArtifactError, match="was built on model fingerprint"):
        load_sae(tmp_path / "sae", model=tiny_loaded.info)
    wide = SparseAutoencoder(32, 48, SAEMeta(site="resid_post.1"))
    wide.to_artifact().save(tmp_path / "narrow")
    with pytest.raises(ArtifactError, match="reads 32-dim activations, this model's hidden size is 64"):
        load_sae(tmp_path / "narrow", model=tiny_loaded.info)


def test_bad_sae_settings_name_the_fix():
    with pytest.raises(ConfigError, match="train 'topk' or 'relu'"):
        SAETrainConfig(architecture="jumprelu")
    with pytest.raises(ConfigError, match="write KIND.LAYER with a layer >= 0"):
        SAEMeta(site="resid_post.-1")
