"""GGUF export of a baked checkpoint: tensor layout (fast, tiny) and a full round trip (slow, embedded)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentguard.artifacts import Artifact
from latentguard.cli.main import main
from latentguard.defenses import build_defense
from latentguard.defenses.bake import export_model
from latentguard.defenses.gguf_export import write_gguf
from latentguard.errors import UnsupportedModelError
from latentguard.hooks import encode_batch
from latentguard.models import LoadedModel, format_prompts, model_info
from tests.conftest import build_tiny


def _export(arch: str, tmp_path, tok) -> tuple[LoadedModel, object]:
    model = build_tiny(arch)
    loaded = LoadedModel(model, tok, model_info(model, arch))
    Artifact("refusal_direction", {"direction": torch.randn(64)}, {"layer": 1}).save(tmp_path / "rd", model=loaded.info)
    return loaded, export_model(loaded, [build_defense(f"ablate:{tmp_path / 'rd'}", loaded)], tmp_path / "export")


def _tiny_template(path) -> str:
    """A metadata-only llama GGUF standing in for the base model's (the embedded one takes ~30 s to copy)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(259)])
    w.add_string("general.name", "tiny")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_tensors_follow_llama_cpp_layout(tmp_path, tiny_tokenizer):
    loaded, out = _export("llama", tmp_path, tiny_tokenizer)
    path = write_gguf(out, _tiny_template(tmp_path / "template.gguf"), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"  # copied from the template
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:2] == ["t0", "t1"]
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= set(tensors)  # untied: both matrices
    q = loaded.model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    got = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(q.shape)
    heads = 4  # undo llama.cpp's interleaved rotary layout (transformers' reverse permute)
    back = got.reshape(heads, q.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(back, q)
    emb = loaded.model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(emb.shape), emb)


def test_gguf_refuses_other_architectures(tmp_path, tiny_tokenizer):
    _, out = _export("gpt2", tmp_path, tiny_tokenizer)
    with pytest.raises(UnsupportedModelError, match="GGUF export covers the llama architecture, not 'gpt2'; run llama.cpp"):
        write_gguf(out, _tiny_template(tmp_path / "template.gguf"))
    assert not (out / "model-f32.gguf").exists()


@pytest.mark.slow
def test_embedded_gguf_round_trip_matches_export(tmp_path, embedded):
    """~1.5 min: transformers' GGUF loader is slow. The GGUF reloads with the same logits and tokenizer."""
    r = torch.randn(576, generator=torch.Generator().manual_seed(0))
    Artifact("refusal_direction", {"direction": r}, {"layer": 12}).save(tmp_path / "rd", model=embedded.info)
    out = tmp_path / "export"
    assert main(["export", "--defense", f"ablate:{tmp_path / 'rd'}", "--gguf", "--out", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out, gguf_file="model-f32.gguf")
    text = format_prompts(embedded.tokenizer, ["How do I pick a lock?", "Name three rivers."])
    assert tok(text[0])["input_ids"] == embedded.tokenizer(text[0])["input_ids"]
    batch = encode_batch(embedded.tokenizer, text)
    with torch.no_grad():
        a, b = (m(**batch.forward_kwargs()).logits[batch.attention_mask.bool()] for m in (hf, from_gguf))
    assert float((a - b).abs().max()) < 1e-5
