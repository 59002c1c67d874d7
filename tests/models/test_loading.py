"""Model loading specs, fingerprints, arch table, chat formatting."""

from __future__ import annotations

import pytest
import torch

from latentguard.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from latentguard.models import (
    arch_of,
    eoi_token_ids,
    fingerprint,
    format_prompts,
    load_model,
    model_info,
)
from tests.conftest import build_tiny


def test_embedded_model_shape(embedded):
    info = embedded.info
    assert (info.architecture, info.n_layers, info.d_model, info.n_heads, info.n_kv_heads, info.head_dim) == (
        "LlamaForCausalLM", 30, 576, 9, 3, 64,
    )
    assert embedded.tokenizer.padding_side == "left" and embedded.tokenizer.pad_token is not None
    assert len(info.fingerprint) == 16


def test_embedded_greedy_answer_is_sensible(embedded):
    tok, model = embedded.tokenizer, embedded.model
    batch = tok(format_prompts(tok, ["What is the capital of France?"]), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:])


def test_embedded_eoi_tokens_end_every_prompt(embedded):
    tok = embedded.tokenizer
    eoi = eoi_token_ids(tok)
    assert tok.decode(eoi) == "<|im_end|>\n<|im_start|>assistant\n"
    for text in format_prompts(tok, ["a", "How are you?\n", "Write code: x = [1, 2]"]):
        assert tok(text, add_special_tokens=False)["input_ids"][-len(eoi):] == eoi


def test_local_dir_roundtrip_keeps_fingerprint(tmp_path, tiny_tokenizer):
    model = build_tiny("qwen2")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.info.fingerprint == model_info(model).fingerprint
    assert loaded.info.model_type == "qwen2"


def test_fingerprint_changes_with_any_weight():
    model = build_tiny("llama")
    before = fingerprint(model)
    with torch.no_grad():
        arch_of(model).o_proj_module(model, 1).weight.add_(1e-3)
    assert fingerprint(model) != before
    assert fingerprint(build_tiny("llama", seed=1)) != before


def test_missing_paths_have_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist; pass an existing model directory"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))


def test_unknown_architecture_is_named():
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "oddformer"})()

    with pytest.raises(UnsupportedModelError, match="add 'oddformer' to ARCHS in models/arch.py"):
        arch_of(Odd())


def test_chat_template_override_and_missing(tmp_path, tiny_tokenizer):
    model = build_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]")
    loaded = load_model(str(tmp_path / "m"), chat_template=str(tpl))
    assert format_prompts(loaded.tokenizer, ["hi"]) == ["[user] hi\n[assistant]"]
    loaded.tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template; pass --chat-template"):
        format_prompts(loaded.tokenizer, ["hi"])


def test_adapter_dir_loads_merged_onto_its_local_base(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_tiny("llama")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    peft = get_peft_model(load_model(str(tmp_path / "base")).model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero: make the adapter change the output
    peft.save_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        plain = load_model(str(tmp_path / "base")).model(input_ids=ids).logits
    loaded = load_model(str(tmp_path / "ckpt"))
    with torch.no_grad():
        got = loaded.model(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter matters...
    assert torch.allclose(got, want, atol=1e-5)  # ...and is merged in
    assert loaded.info.fingerprint != model_info(load_model(str(tmp_path / "base")).model).fingerprint

    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text('{"base_model_name_or_path": "/nowhere/base"}')
    with pytest.raises(ModelNotFoundError, match="latentguard merge"):
        load_model(str(tmp_path / "orphan"))
