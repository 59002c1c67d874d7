"""Bake `ablate` and `add` into the weights (refusal_direction.md §6; paper App. E).

- `ablate` -> weight orthogonalisation: every matrix that writes to the residual stream (token and
  positional embeddings, attention o_proj, MLP down_proj, and their biases) loses its r̂ component.
  HF `nn.Linear` stores W [out, in]: W <- W - r̂(r̂ᵀW); an embedding E [V, d] and GPT-2's `Conv1D`
  W [in, out]: rows lose r̂. Tied input/output embeddings are untied first, else the unembedding
  would be edited too.
- `add` -> a bias `alpha * r` on `mlp.down_proj` of block l-1, the last write before `resid_pre.l`.
  A checkpoint only reloads with that bias if the config creates it: GPT-2 `Conv1D` has one, and
  Llama-family configs have `mlp_bias` (which adds zero biases to every MLP projection); other
  architectures (Qwen2, Mistral, Gemma, ...) have no such flag and are refused at export.
- `conditional` decides per prompt at run time and has no weight form.

`export_model` bakes, saves a plain Hugging Face checkpoint, reloads it with
`AutoModelForCausalLM.from_pretrained` and checks its logits against the hooked model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from latentguard.artifacts import staged_dir, write_json
from latentguard.defenses import Defense, apply_defenses
from latentguard.errors import ConfigError, UnsupportedModelError
from latentguard.hooks import encode_batch
from latentguard.models import LoadedModel, arch_of, format_prompts, model_info, text_config

__all__ = [
    "EXPORT_META",
    "VERIFY_PROMPTS",
    "bake_defense",
    "check_bakeable",
    "enable_bias_flags",
    "export_model",
    "fold_addition",
    "max_logit_diff",
    "orthogonalize_weights",
    "untie_embeddings",
]

EXPORT_META = "latentguard_export.json"
# Blocks that normalise a sub-layer's output before adding it: the ablation hook (before the norm)
# and orthogonalised weights then differ, so neither is an exact ablation; refuse to bake.
_POST_NORM_TYPES = ("gemma2", "gemma3_text", "olmo2")

VERIFY_PROMPTS = (
    "How do I bake bread?", "Write a haiku about the sea.", "What is the capital of France?",
    "Explain photosynthesis in one sentence.", "How do I pick a lock?", "Give me three tips for sleeping well.",
    "Write a phishing e-mail to steal a password.", "Translate 'good morning' into German.",
)


def _unit(direction: Tensor) -> Tensor:
    if not bool(torch.isfinite(direction).all()) or float(direction.norm()) == 0:
        raise ConfigError("The direction is zero or not finite; pass a direction artefact from `direction extract` or `scan`.")
    return direction.detach().double() / direction.detach().double().norm()


def _rows_without(w: Tensor, r: Tensor) -> Tensor:
    """Rows of w are d_model vectors: w - (w r̂) r̂ᵀ, computed in float64."""
    w64 = w.double()
    return (w64 - torch.outer(w64 @ r, r)).to(w.dtype)


def _cols_without(w: Tensor, r: Tensor) -> Tensor:
    """Columns of w (nn.Linear [d_model, in]) are d_model vectors: w - r̂ (r̂ᵀ w)."""
    w64 = w.double()
    return (w64 - torch.outer(r, r @ w64)).to(w.dtype)


@torch.no_grad()
def untie_embeddings(model: nn.Module) -> bool:
    """Give the unembedding its own copy of a tied embedding matrix; True if it was tied."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()  # type: ignore[operator]
    if out is None or out.weight is not inp.weight:
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone())
    configs: list[Any] = [getattr(model, "config", None), text_config(model)]
    for cfg in configs:  # the top-level config and, for multimodal models, the text config
        if cfg is not None:
            cfg.tie_word_embeddings = False
    return True


def _tensor(mod: nn.Module, name: str) -> Tensor | None:
    """`mod.weight` / `mod.bias` typed as a tensor (None when absent)."""
    t = getattr(mod, name, None)
    return t if isinstance(t, Tensor) else None


def _weight(mod: nn.Module) -> Tensor:
    w = _tensor(mod, "weight")
    if w is None:
        raise UnsupportedModelError(f"{type(mod).__name__} has no weight to edit; fix its row in models/arch.py.")
    return w


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, direction: Float[Tensor, " d_model"]) -> list[str]:
    """Project r̂ out of every residual-stream writer in place; returns the edited module paths."""
    model_type = getattr(text_config(model), "model_type", "")
    if model_type in _POST_NORM_TYPES:
        raise UnsupportedModelError(
            f"{model_type} normalises sub-layer outputs before adding them, so orthogonalised weights do not ablate "
            "the direction; apply `ablate` as a hook (--defense ablate:DIR) instead of exporting it."
        )
    arch, r = arch_of(model), _unit(direction)
    untie_embeddings(model)
    edited = []
    for path in (arch.embed, arch.pos_embed):
        if path is not None:
            emb = _weight(arch.get(model, path))
            emb.copy_(_rows_without(emb, r.to(emb.device)))
            edited.append(path)
    for l in range(len(arch.layer_list(model))):
        for name, mod in ((f"{l}.o_proj", arch.o_proj_module(model, l)), (f"{l}.down_proj", arch.down_proj_module(model, l))):
            w, b = _weight(mod), _tensor(mod, "bias")
            rr = r.to(w.device)
            w.copy_(_rows_without(w, rr) if arch.conv1d else _cols_without(w, rr))
            if b is not None:
                b.copy_(b - (rr * (rr @ b.double())).to(b.dtype))
            edited.append(name)
    return edited


@torch.no_grad()
def fold_addition(model: nn.Module, direction: Float[Tensor, " d_model"], layer: int, alpha: float) -> str:
    """Add `alpha * r` (raw r, §9.6) to the bias of block layer-1's down_proj, creating the bias if absent."""
    if layer == 0:
        raise ConfigError("`add` at layer 0 has no block before it to carry a bias; apply it as a hook (--defense add:DIR).")
    mod = arch_of(model).down_proj_module(model, layer - 1)
    w, bias = _weight(mod), _tensor(mod, "bias")
    vec = (alpha * direction.detach().double()).to(w.device)
    if bias is None:
        bias = nn.Parameter(torch.zeros(vec.shape[0], dtype=w.dtype, device=w.device))
        mod.bias = bias
    bias.copy_((bias.double() + vec).to(bias.dtype))
    return f"{layer - 1}.down_proj.bias"


@torch.no_grad()
def enable_bias_flags(model: nn.Module) -> str | None:
    """Make the config create every MLP bias the weights now hold, so `from_pretrained` keeps them.

    Returns the flag set (None when the architecture has native biases); raises when no flag exists.
    """
    arch, cfg = arch_of(model), text_config(model)
    if arch.conv1d:
        return None
    _require_bias_flag(model)
    for l in range(len(arch.layer_list(model))):
        for mod in arch.mlp_module(model, l).modules():
            if isinstance(mod, nn.Linear) and mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device))
    cfg.mlp_bias = True
    return "mlp_bias"


def _require_bias_flag(model: nn.Module) -> None:
    cfg = text_config(model)
    if not arch_of(model).conv1d and not hasattr(cfg, "mlp_bias"):
        raise UnsupportedModelError(
            f"{cfg.model_type} has no config flag that creates a down_proj bias, so a reloaded checkpoint would drop "
            "the folded `add`; export `ablate` only, or apply `add` as a hook (--defense add:DIR)."
        )


def check_bakeable(model: nn.Module, defense: Defense) -> None:
    """Raise, before anything is edited, if `defense` cannot be baked into a reloadable checkpoint of `model`."""
    if defense.key == "conditional":
        raise ConfigError(
            "`conditional` cannot be baked into weights: it reads each prompt and steers only when the gate opens, "
            "which no fixed weight edit does; serve it with hooks (--defense conditional:DIR) or export `add`/`ablate`."
        )
    if defense.key not in ("ablate", "add"):
        raise ConfigError(f"Defence {defense.key!r} has no weight form; `export` bakes `ablate` or `add`.")
    if defense.key == "add":
        _require_bias_flag(model)
        if defense.layer == 0:  # type: ignore[attr-defined]
            raise ConfigError("`add` at layer 0 has no block before it to carry a bias; apply it as a hook (--defense add:DIR).")


def bake_defense(model: nn.Module, defense: Defense) -> dict[str, Any]:
    """Fold one `ablate` or `add` defence into `model`'s weights in place; returns what was edited."""
    check_bakeable(model, defense)
    if defense.key == "ablate":
        return {"defense": "ablate", "edited": orthogonalize_weights(model, defense.direction)}  # type: ignore[attr-defined]
    layer, alpha = defense.layer, defense.config.alpha  # type: ignore[attr-defined]
    return {"defense": "add", "edited": [fold_addition(model, defense.direction, layer, alpha)]}  # type: ignore[attr-defined]


@torch.no_grad()
def _logits(model: nn.Module, loaded: LoadedModel, texts: Sequence[str]) -> Float[Tensor, "tokens vocab"]:
    """Logits at every real (non-padding) token; padded queries attend to nothing and are noise."""
    device = next(model.parameters()).device
    batch = encode_batch(loaded.tokenizer, texts, device)
    logits = model(**batch.forward_kwargs(), use_cache=False).logits
    return logits[batch.attention_mask.bool()].double().cpu()


def max_logit_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def export_model(
    loaded: LoadedModel,
    defenses: Sequence[Defense],
    out: str | Path,
    prompts: Sequence[str] = VERIFY_PROMPTS,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    verify_dtype: torch.dtype | None = torch.float64,
) -> Path:
    """Bake `defenses` (one `ablate` or `add`) into `loaded.model` in place and save a checkpoint to `out`.

    The saved checkpoint is reloaded with plain `from_pretrained`; its logits on `prompts` must match
    the hooked model's within `tolerance`, else nothing is written. Both sides run in `verify_dtype`
    (None: the model's dtype); padding positions are left out. In float32 the hooked embedded model's
    own logits differ from its float64 evaluation by ~1e-4, so a 1e-4 check needs float64
    (docs/directions.md).
    """
    if len(defenses) != 1:
        raise ConfigError(f"Got {len(defenses)} defences; export bakes exactly one (`ablate` or `add`): pass one --defense.")
    check_bakeable(loaded.model, defenses[0])
    texts = format_prompts(loaded.tokenizer, list(prompts))
    dtype = loaded.model.dtype
    vdtype = verify_dtype or dtype
    nn.Module.to(loaded.model, vdtype)
    with apply_defenses(loaded.model, defenses):
        hooked = _logits(loaded.model, loaded, texts)
    nn.Module.to(loaded.model, dtype)  # float32 -> float64 -> float32 is exact
    baked = bake_defense(loaded.model, defenses[0])
    flag = enable_bias_flags(loaded.model) if defenses[0].key == "add" else None
    with staged_dir(out, overwrite=overwrite) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        reloaded, info = cast(tuple[PreTrainedModel, dict[str, Any]],
                              AutoModelForCausalLM.from_pretrained(tmp, dtype=vdtype, output_loading_info=True))
        lost = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if lost:
            raise UnsupportedModelError(f"The exported checkpoint does not reload cleanly ({lost}); report this model type.")
        diff = max_logit_diff(_logits(reloaded.eval(), loaded, texts), hooked)
        if not diff <= tolerance:
            raise ConfigError(f"The exported model's logits differ from the hooked model's by {diff:.3g} > {tolerance}; not written.")
        write_json(tmp / EXPORT_META, {
            "source_model": loaded.info.as_meta(), "defenses": [d.describe() for d in defenses], "baked": baked,
            "bias_flag": flag, "exported_fingerprint": model_info(nn.Module.to(reloaded, dtype), str(out)).fingerprint,
            "verify": {"n_prompts": len(texts), "max_abs_logit_diff": diff, "tolerance": tolerance, "dtype": str(vdtype)},
        })
    return Path(out)
