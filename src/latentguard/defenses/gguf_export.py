"""Write an exported (baked) Llama-architecture checkpoint as an F32 GGUF file for llama.cpp.

The `gguf` package has the writer and the HF -> GGUF tensor-name map, but not llama.cpp's
`convert_hf_to_gguf.py`, whose tokenizer step identifies the pre-tokenizer (`tokenizer.ggml.pre`)
from its own table of tokenizer hashes. So the tokenizer and general metadata are copied from a
*template* GGUF of the same base model (the embedded model ships as one); the architecture
fields and tensors come from the exported checkpoint. Q/K projections are permuted into
llama.cpp's rotary layout, as `convert_hf_to_gguf.py` does. A baked `add` bias is written as
`blk.N.ffn_down.bias`, which llama.cpp's llama architecture loads as an optional tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from latentguard.errors import ModelNotFoundError, UnsupportedModelError

__all__ = ["GGUF_NAME", "write_gguf"]

GGUF_NAME = "model-f32.gguf"
_SKIP_KEYS = ("GGUF.", "general.file_type", "general.quantization_version", "general.architecture")


def _state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{model_dir} holds no .safetensors weights; pass a directory written by `latentguard export`.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary (half-split) layout -> llama.cpp's interleaved layout (convert_hf_to_gguf `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy_template(writer: gguf.GGUFWriter, template: Path) -> None:
    reader = gguf.GGUFReader(str(template))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise UnsupportedModelError(f"Template {template} is a {arch!r} GGUF; pass the llama-architecture GGUF of the base model.")
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_KEYS):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)


def _tensors(writer: gguf.GGUFWriter, state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    for hf_name, t in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"No GGUF name for tensor {hf_name!r}; this checkpoint is not a plain Llama layout.")
        data = t.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(data))


def write_gguf(model_dir: str | Path, template: str | Path, out_file: str | Path | None = None) -> Path:
    """Write `model_dir` (an export of a Llama-architecture model) as an F32 GGUF; returns its path.

    Args:
        template: a GGUF of the same base model; its tokenizer and general metadata are copied.
    """
    model_dir, template = Path(model_dir), Path(template)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise UnsupportedModelError(
            f"GGUF export covers the llama architecture, not {cfg.get('model_type')!r}; run llama.cpp's "
            f"`convert_hf_to_gguf.py {model_dir}` on the exported checkpoint instead."
        )
    if not template.is_file():
        raise ModelNotFoundError(f"GGUF template {template} does not exist; pass the base model's .gguf file.")
    out = Path(out_file) if out_file else model_dir / GGUF_NAME
    writer = gguf.GGUFWriter(str(out), "llama")  # adds general.architecture itself
    try:
        _copy_template(writer, template)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_string("latentguard.export", (model_dir / "latentguard_export.json").read_text()
                          if (model_dir / "latentguard_export.json").is_file() else "{}")
        _tensors(writer, _state_dict(model_dir), cfg)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        out.unlink(missing_ok=True)
        raise
    writer.close()
    return out
