"""Named hook sites (`"resid_post.14"`) and one function that attaches a hook to any of them.

Sites, per decoder block l (0-based; negative layers count from the end):
- `resid_pre.l`  block input (= `output_hidden_states[l]`)
- `resid_post.l` block output (= `output_hidden_states[l+1]`, except after the last block,
  where transformers applies the final norm first)
- `attn_out.l`   output of the attention module, before it is added to the stream
- `mlp_out.l`    output of the MLP module, before it is added to the stream
- `head_out.l`   input of the attention output projection (o_proj), split per head:
  `[..., n_heads, head_dim]`
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from latentguard.errors import ConfigError
from latentguard.models.arch import arch_of, normalize_layer, text_config

__all__ = ["SITE_KINDS", "Site", "all_sites", "count_hooks", "hook_site", "parse_site", "parse_sites"]

SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")

# fn(activation) -> replacement or None (read-only). For head_out the activation is [..., H, hd].
ActivationFn = Callable[[Tensor], Tensor | None]


@dataclass(frozen=True, order=True)
class Site:
    kind: str
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"


def parse_site(name: str | Site, n_layers: int) -> Site:
    """Parse `"kind.layer"`, normalising a negative layer; raise naming the valid forms."""
    if isinstance(name, Site):
        return Site(name.kind, normalize_layer(name.layer, n_layers))
    kind, _, layer = str(name).partition(".")
    if kind not in SITE_KINDS or not layer.lstrip("-").isdigit():
        raise ConfigError(
            f"Bad site {name!r}; write KIND.LAYER with KIND one of {', '.join(SITE_KINDS)} "
            f"(e.g. 'resid_post.14')."
        )
    return Site(kind, normalize_layer(int(layer), n_layers))


def parse_sites(model: nn.Module, names: Sequence[str | Site]) -> list[Site]:
    n_layers = len(arch_of(model).layer_list(model))
    return [parse_site(n, n_layers) for n in names]


def all_sites(model: nn.Module, kind: str) -> list[Site]:
    return [Site(kind, i) for i in range(len(arch_of(model).layer_list(model)))]


def _heads(model: nn.Module) -> int:
    cfg = text_config(model)
    return int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _output_hook(fn: ActivationFn) -> Callable[..., Any]:
    def hook(_mod: nn.Module, _args: Any, out: Any) -> Any:
        new = fn(_first(out))
        return None if new is None else _replace_first(out, new)

    return hook


def _input_hook(fn: ActivationFn, n_heads: int | None) -> Callable[..., Any]:
    """Pre-hook on the first input (positional or `hidden_states=`); optional per-head view."""

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        view = x.unflatten(-1, (n_heads, -1)) if n_heads else x
        new = fn(view)
        if new is None:
            return None
        new = new.flatten(-2) if n_heads else new
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return hook


def hook_site(model: nn.Module, site: Site, fn: ActivationFn) -> RemovableHandle:
    """Attach `fn` at `site`; the caller owns the handle (use inside try/finally)."""
    arch = arch_of(model)
    if site.kind == "resid_pre":
        return arch.block(model, site.layer).register_forward_pre_hook(_input_hook(fn, None), with_kwargs=True)
    if site.kind == "resid_post":
        return arch.block(model, site.layer).register_forward_hook(_output_hook(fn))
    if site.kind == "attn_out":
        return arch.attn_module(model, site.layer).register_forward_hook(_output_hook(fn))
    if site.kind == "mlp_out":
        return arch.mlp_module(model, site.layer).register_forward_hook(_output_hook(fn))
    if site.kind == "head_out":
        o_proj = arch.o_proj_module(model, site.layer)
        return o_proj.register_forward_pre_hook(_input_hook(fn, _heads(model)), with_kwargs=True)
    raise ConfigError(f"Unknown site kind {site.kind!r}; use one of {', '.join(SITE_KINDS)}.")


def count_hooks(model: nn.Module) -> int:
    """Forward and pre-forward hooks attached anywhere in `model` (for leak checks)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )
