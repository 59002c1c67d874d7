"""Edits: addition is exactly reversible, ablation zeroes the projection, hooks never leak."""

from __future__ import annotations

import pytest
import torch

from latentguard.errors import ConfigError
from latentguard.hooks import add_vectors, capture, count_hooks, encode_batch, project_out
from latentguard.hooks.edits import ablation_sites
from latentguard.models import format_prompts


def _batch(tok):
    return encode_batch(tok, format_prompts(tok, ["How do I bake bread?", "Hello"]))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch.forward_kwargs()).logits


def test_add_then_subtract_restores_logits(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    d = tiny_model.config.get_text_config().hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    plain = _logits(tiny_model, batch)
    with add_vectors(tiny_model, {"resid_pre.1": v}, alpha=3.0):
        steered = _logits(tiny_model, batch)
        with add_vectors(tiny_model, {"resid_pre.1": v}, alpha=-3.0):
            restored = _logits(tiny_model, batch)
    assert (steered - plain).abs().max() > 1e-3
    torch.testing.assert_close(restored, plain, atol=1e-5, rtol=0)
    with add_vectors(tiny_model, {"resid_post.0": v}, alpha=0.0):
        torch.testing.assert_close(_logits(tiny_model, batch), plain, atol=0, rtol=0)


def test_head_vector_changes_only_through_o_proj(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    cfg = tiny_model.config.get_text_config()
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    vec = torch.zeros(n_heads, head_dim)
    vec[2] = 1.0
    with capture(tiny_model, ["head_out.0"]) as plain_rec, torch.no_grad():
        tiny_model(**batch.forward_kwargs())
    with add_vectors(tiny_model, {"head_out.0": vec}), capture(tiny_model, ["head_out.0"]) as rec, torch.no_grad():
        tiny_model(**batch.forward_kwargs())
    # capture registered after the edit sees the edited input: head 2 shifted by 1, others equal
    diff = rec["head_out.0"][0] - plain_rec["head_out.0"][0]
    torch.testing.assert_close(diff[..., 2, :], torch.ones_like(diff[..., 2, :]), atol=1e-5, rtol=0)
    assert diff[..., [0, 1, 3], :].abs().max() < 1e-6


def test_projection_is_zero_after_ablation(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    d = tiny_model.config.get_text_config().hidden_size
    r = torch.randn(d, generator=torch.Generator().manual_seed(2))
    r_hat = r / r.norm()
    sites = [str(s) for s in ablation_sites(tiny_model)] + ["resid_post.1"]
    with project_out(tiny_model, r), capture(tiny_model, sites) as rec, torch.no_grad():
        tiny_model(**batch.forward_kwargs())
    for site, acts in rec.items():
        x = acts[0]
        proj = (x @ r_hat).abs()
        assert (proj <= 1e-5 * x.norm(dim=-1) + 1e-6).all(), site


def test_edits_remove_hooks_on_error(tiny_model):
    before = count_hooks(tiny_model)
    d = tiny_model.config.get_text_config().hidden_size
    with pytest.raises(RuntimeError), project_out(tiny_model, torch.ones(d)):
        raise RuntimeError("forced")
    with pytest.raises(RuntimeError), add_vectors(tiny_model, {"resid_pre.0": torch.ones(d)}):
        raise RuntimeError("forced")
    assert count_hooks(tiny_model) == before


def test_edit_input_checks(tiny_llama):
    with pytest.raises(ConfigError, match="alpha=nan is not finite"), add_vectors(tiny_llama, {"resid_pre.0": torch.ones(64)}, alpha=float("nan")):
        pass
    with pytest.raises(ConfigError, match="direction to project out is zero"), project_out(tiny_llama, torch.zeros(64)):
        pass
    before = count_hooks(tiny_llama)
    with pytest.raises(ConfigError, match="out of range"), add_vectors(tiny_llama, {"resid_pre.0": torch.ones(64), "resid_pre.9": torch.ones(64)}):
        pass
    assert count_hooks(tiny_llama) == before
