"""Drift of the refusal direction between a base model and tuned checkpoints of it.

Per layer l, from the block input at one prompt position (default the last token):
- `cos`: cosine of the diff-in-means directions r_base[l] and r_tuned[l];
- `shift_harmful` / `shift_harmless`: how far the tuned model moves each class's mean projection
  onto r̂_base[l] (tuned mean − base mean);
plus the refusal proxy (§3) of both models on both classes. With a direction artefact, the
summary layer and position are the artefact's and `cos_direction` compares it with r_tuned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentguard.directions.metrics import refusal_metric, refusal_token_ids
from latentguard.directions.selection import encode_prompts
from latentguard.errors import ConfigError
from latentguard.hooks import capture
from latentguard.models import LoadedModel, format_prompts

__all__ = ["ClassStats", "DriftConfig", "class_stats", "compare_stats"]


@dataclass
class DriftConfig:
    n: int = field(default=64, metadata={"help": "prompts per class (seeded sample of each file)"})
    seed: int = field(default=42, metadata={"help": "seed of the prompt samples"})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass"})
    refusal_tokens: str = field(default="I", metadata={"help": "comma-separated refusal words for the proxy (spec §3)"})
    system: str | None = field(default=None, metadata={"help": "system prompt (default: the chat template's own)"})

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ConfigError(f"n={self.n}; use at least 2 prompts per class.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}; use >= 1.")

    def refusal_words(self) -> list[str]:
        return [w.strip() for w in self.refusal_tokens.split(",") if w.strip()]


@dataclass
class ClassStats:
    """Block-input activations at one position, all layers, for both classes, plus the proxy."""

    harmful: Float[Tensor, "n L d"]
    harmless: Float[Tensor, "n L d"]
    proxy_harmful: Float[Tensor, " n"]
    proxy_harmless: Float[Tensor, " n"]

    def directions(self) -> Float[Tensor, "L d"]:
        """Diff-in-means per layer, float64."""
        return self.harmful.double().mean(0) - self.harmless.double().mean(0)


@torch.no_grad()
def _pass(loaded: LoadedModel, texts: list[str], position: int, ids: list[int], batch: int) -> tuple[Tensor, Tensor]:
    sites = [f"resid_pre.{l}" for l in range(loaded.info.n_layers)]
    acts, logits = [], []
    with capture(loaded.model, sites, reduce=lambda x: x[:, position]) as rec:
        for b in encode_prompts(loaded, texts, batch).batches:
            logits.append(loaded.model(**b, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu())
            acts.append(torch.stack([rec[s].pop() for s in sites], dim=1))
    return torch.cat(acts), refusal_metric(torch.cat(logits), ids)


def class_stats(loaded: LoadedModel, harmful: list[str], harmless: list[str], cfg: DriftConfig, position: int = -1) -> ClassStats:
    """One tapped pass per class over raw prompts (chat-formatted here)."""
    if position >= 0:
        raise ConfigError(f"position={position}; pass a negative index from the end of the prompt, e.g. -1.")
    ids = refusal_token_ids(loaded.tokenizer, cfg.refusal_words())
    fmt = [format_prompts(loaded.tokenizer, p, cfg.system) for p in (harmful, harmless)]
    (h, ph), (b, pb) = (_pass(loaded, f, position, ids, cfg.batch_size) for f in fmt)
    return ClassStats(h, b, ph, pb)


def _cos(a: Tensor, b: Tensor) -> float | None:
    """Cosine, or None where a direction is zero (layer 0 at a template token is the same for every prompt)."""
    den = float(a.norm() * b.norm())
    return None if den == 0 else float(a @ b) / den


def _shift(base: Tensor, tuned: Tensor, unit: Tensor) -> float:
    return float(tuned.double().mean(0) @ unit - base.double().mean(0) @ unit)


def compare_stats(
    base: ClassStats, tuned: ClassStats, layer: int, direction: Float[Tensor, " d"] | None = None
) -> dict[str, Any]:
    """Per-layer cosine and projection shifts of `tuned` against `base`, and the proxy of `tuned`."""
    if base.harmful.shape[1:] != tuned.harmful.shape[1:]:
        raise ConfigError(
            f"The tuned model's activations {tuple(tuned.harmful.shape[1:])} do not match the base model's "
            f"{tuple(base.harmful.shape[1:])} (layers, d_model); compare checkpoints of the same base."
        )
    r_base, r_tuned = base.directions(), tuned.directions()
    rows = []
    for l in range(r_base.shape[0]):
        unit = r_base[l] / r_base[l].norm() if float(r_base[l].norm()) > 0 else r_base[l]
        rows.append({"layer": l, "cos": _cos(r_base[l], r_tuned[l]),
                     "shift_harmful": _shift(base.harmful[:, l], tuned.harmful[:, l], unit),
                     "shift_harmless": _shift(base.harmless[:, l], tuned.harmless[:, l], unit),
                     "norm_base": float(r_base[l].norm()), "norm_tuned": float(r_tuned[l].norm())})
    at = dict(rows[layer])
    at["cos_direction"] = None
    if direction is not None:
        d = direction.double()
        unit = d / d.norm()
        at.update(cos_direction=_cos(d, r_tuned[layer]), shift_harmful=_shift(base.harmful[:, layer], tuned.harmful[:, layer], unit),
                  shift_harmless=_shift(base.harmless[:, layer], tuned.harmless[:, layer], unit))
    proxy = {"harmful": float(tuned.proxy_harmful.mean()), "harmless": float(tuned.proxy_harmless.mean()),
             "harmful_positive_frac": float((tuned.proxy_harmful > 0).double().mean()),
             "harmless_positive_frac": float((tuned.proxy_harmless > 0).double().mean())}
    return {"layers": rows, "at_layer": at, "proxy": proxy}
