"""Module paths per `model_type`: a table, not forked modeling code.

Each row says where a Hugging Face causal LM keeps its decoder blocks and, inside a
block, its attention output projection (o_proj) and MLP down projection. Everything
in `hooks/` resolves modules through `arch_of(model)`, so supporting a new
architecture means adding one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from latentguard.errors import ConfigError, UnsupportedModelError

__all__ = ["ARCHS", "PROJECTION_ROLES", "ArchSpec", "arch_of", "normalize_layer", "text_config"]

PROJECTION_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ArchSpec:
    """Dotted attribute paths, relative to the model or to one decoder block."""

    layers: str  # ModuleList of decoder blocks, from the top-level model
    attn: str  # attention module, from a block
    o_proj: str  # output projection, from the attention module (its input is per-head)
    mlp: str  # MLP module, from a block
    down_proj: str  # MLP output projection, from the MLP module
    embed: str  # token embedding, from the top-level model
    final_norm: str  # norm before the unembedding, from the top-level model
    pos_embed: str | None = None  # learned positional embedding, if any
    conv1d: bool = False  # GPT-2 style Conv1D: weight stored [in, out]
    # separate projections by role (None: fused or absent, e.g. GPT-2's c_attn); from attn / mlp
    q_proj: str | None = "q_proj"
    k_proj: str | None = "k_proj"
    v_proj: str | None = "v_proj"
    gate_proj: str | None = "gate_proj"
    up_proj: str | None = "up_proj"

    def get(self, root: nn.Module, path: str) -> nn.Module:
        mod: Any = root
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                raise UnsupportedModelError(
                    f"{type(root).__name__} has no module at {path!r}; fix its row in models/arch.py."
                )
        return mod

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        mods = self.get(model, self.layers)
        if not isinstance(mods, nn.ModuleList):
            raise UnsupportedModelError(
                f"{self.layers!r} on {type(model).__name__} is not a ModuleList; fix models/arch.py."
            )
        return mods

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return self.layer_list(model)[layer]

    def attn_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.get(self.block(model, layer), self.attn)

    def o_proj_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.get(self.attn_module(model, layer), self.o_proj)

    def mlp_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.get(self.block(model, layer), self.mlp)

    def down_proj_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.get(self.mlp_module(model, layer), self.down_proj)

    def projection_module(self, model: nn.Module, layer: int, role: str) -> nn.Module:
        """A block's linear projection by role: q, k, v, o (attention) or gate, up, down (MLP)."""
        if role == "o":
            return self.o_proj_module(model, layer)
        if role == "down":
            return self.down_proj_module(model, layer)
        if role not in PROJECTION_ROLES:
            raise ConfigError(f"Unknown projection role {role!r}; use one of {', '.join(PROJECTION_ROLES)}.")
        path = getattr(self, f"{role}_proj")
        if path is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no separate {role} projection (fused); pick other roles or add its "
                "path to models/arch.py."
            )
        parent = self.attn_module(model, layer) if role in ("q", "k", "v") else self.mlp_module(model, layer)
        return self.get(parent, path)


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    attn="self_attn",
    o_proj="o_proj",
    mlp="mlp",
    down_proj="down_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
)

ARCHS: dict[str, ArchSpec] = {
    **{
        t: _LLAMA_LIKE
        for t in (
            "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
            "olmo", "olmo2", "granite", "smollm3", "phi3", "cohere", "starcoder2_llama",
        )
    },
    "gpt2": ArchSpec(
        layers="transformer.h",
        attn="attn",
        o_proj="c_proj",
        mlp="mlp",
        down_proj="c_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        pos_embed="transformer.wpe",
        conv1d=True,
        q_proj=None, k_proj=None, v_proj=None, gate_proj=None, up_proj=None,
    ),
}


def text_config(model: nn.Module) -> Any:
    """The language-model part of the config (multimodal configs nest it)."""
    cfg = cast(Any, model).config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def arch_of(model: nn.Module) -> ArchSpec:
    """The ArchSpec for `model`, by `model_type`; unknown types get the Llama layout if it fits."""
    model_type = getattr(text_config(model), "model_type", None)
    spec = ARCHS.get(model_type or "")
    if spec is not None:
        return spec
    try:  # many recent architectures share the Llama layout; accept it only if it resolves
        _LLAMA_LIKE.o_proj_module(model, 0)
        _LLAMA_LIKE.down_proj_module(model, 0)
    except (UnsupportedModelError, IndexError, TypeError) as e:
        raise UnsupportedModelError(
            f"No known decoder layout for {type(model).__name__} (model_type={model_type!r}); "
            f"add {model_type!r} to ARCHS in models/arch.py."
        ) from e
    return _LLAMA_LIKE


def normalize_layer(layer: int, n_layers: int) -> int:
    """Map a possibly negative layer index to 0..n_layers-1, or raise naming the range."""
    if not -n_layers <= layer < n_layers:
        raise ConfigError(
            f"Layer {layer} is out of range for a model with {n_layers} layers; "
            f"use 0..{n_layers - 1} (or -{n_layers}..-1 from the end)."
        )
    return layer % n_layers
