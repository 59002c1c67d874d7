"""Taps against the model as oracle, on five architectures."""

from __future__ import annotations

import pytest
import torch

from latentguard.hooks import capture, collect, count_hooks, encode_batch
from latentguard.models import format_prompts

PROMPTS = ["Tell me a story about a cat.", "Hi", "What is 2+2? Explain carefully please."]


def _texts(tok):
    return format_prompts(tok, PROMPTS)


def test_resid_taps_equal_output_hidden_states(tiny_model, tiny_tokenizer):
    batch = encode_batch(tiny_tokenizer, _texts(tiny_tokenizer))
    n_layers = 2
    sites = [f"resid_pre.{l}" for l in range(n_layers)] + [f"resid_post.{l}" for l in range(n_layers)]
    with torch.no_grad(), capture(tiny_model, sites) as rec:
        out = tiny_model(**batch.forward_kwargs(), output_hidden_states=True)
    hs = out.hidden_states
    for l in range(n_layers):
        torch.testing.assert_close(rec[f"resid_pre.{l}"][0], hs[l], atol=1e-5, rtol=0)
    # resid_post of every block but the last is the next block's input (the last gets the final norm)
    torch.testing.assert_close(rec["resid_post.0"][0], hs[1], atol=1e-5, rtol=0)
    assert not torch.allclose(rec["resid_post.1"][0], hs[2], atol=1e-3)


def test_head_out_reassembles_o_proj_input(tiny_model, tiny_tokenizer):
    from latentguard.models import arch_of

    batch = encode_batch(tiny_tokenizer, _texts(tiny_tokenizer))
    seen = []
    o_proj = arch_of(tiny_model).o_proj_module(tiny_model, 1)
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad(), capture(tiny_model, ["head_out.1"]) as rec:
            tiny_model(**batch.forward_kwargs())
    finally:
        handle.remove()
    heads = rec["head_out.1"][0]
    n_heads = tiny_model.config.get_text_config().num_attention_heads
    assert heads.shape[-2] == n_heads and heads.dim() == 4
    torch.testing.assert_close(heads.flatten(-2), seen[0], atol=0, rtol=0)


def test_left_padding_does_not_change_captures(tiny_model, tiny_tokenizer):
    texts = _texts(tiny_tokenizer)
    sites = ["resid_post.0", "resid_post.1", "head_out.1", "mlp_out.0", "attn_out.1"]
    alone = collect(tiny_model, tiny_tokenizer, texts[1:2], sites, positions="last", progress=False)
    batched = collect(tiny_model, tiny_tokenizer, texts, sites, positions="last", progress=False)
    mean_alone = collect(tiny_model, tiny_tokenizer, texts[1:2], sites, positions="mean", progress=False)
    mean_batched = collect(tiny_model, tiny_tokenizer, texts, sites, positions="mean", progress=False)
    for s in sites:
        torch.testing.assert_close(batched[s][1], alone[s][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(mean_batched[s][1], mean_alone[s][0], atol=1e-4, rtol=0)


def test_position_selections_shapes_and_values(tiny_llama, tiny_tokenizer):
    texts = _texts(tiny_tokenizer)
    full = collect(tiny_llama, tiny_tokenizer, texts[:1], ["resid_post.0"], positions="mean", progress=False)
    eoi = collect(tiny_llama, tiny_tokenizer, texts, ["resid_post.0"], positions=[-3, -2, -1], progress=False)
    last = collect(tiny_llama, tiny_tokenizer, texts, ["resid_post.0"], positions="last", progress=False)
    assert eoi["resid_post.0"].shape == (3, 3, 64)
    torch.testing.assert_close(eoi["resid_post.0"][:, -1], last["resid_post.0"])
    assert full["resid_post.0"].shape == (1, 64)


def test_response_positions_select_only_response_tokens(tiny_llama, tiny_tokenizer):
    prompt = _texts(tiny_tokenizer)[0]
    pairs = [(prompt, "Sure, here it is."), (prompt, "No.")]
    toks = collect(tiny_llama, tiny_tokenizer, pairs, ["resid_post.1"], positions="response_tokens", progress=False)
    n_resp = sum(len(tiny_tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r in pairs)
    assert toks["resid_post.1"].shape == (n_resp, 64)
    mean = collect(tiny_llama, tiny_tokenizer, pairs, ["resid_post.1"], positions="response_mean", progress=False)
    n0 = len(tiny_tokenizer("Sure, here it is.", add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(mean["resid_post.1"][0], toks["resid_post.1"][:n0].mean(0), atol=1e-5, rtol=0)


def test_capture_removes_hooks_on_error(tiny_model):
    before = count_hooks(tiny_model)
    with pytest.raises(RuntimeError, match="boom"), capture(tiny_model, ["resid_pre.0", "head_out.1", "mlp_out.1"]):
        assert count_hooks(tiny_model) == before + 3
        raise RuntimeError("boom")
    assert count_hooks(tiny_model) == before


def test_bad_site_and_layer_messages(tiny_llama):
    from latentguard.errors import ConfigError

    with pytest.raises(ConfigError, match="Bad site 'resid.1'"), capture(tiny_llama, ["resid.1"]):
        pass
    with pytest.raises(ConfigError, match="Layer 7 is out of range for a model with 2 layers"), capture(tiny_llama, ["resid_post.7"]):
        pass
    with capture(tiny_llama, ["resid_post.-1"]) as rec:
        assert list(rec) == ["resid_post.1"]
