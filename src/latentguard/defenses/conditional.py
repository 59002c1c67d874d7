"""`conditional`: CAST-style conditional activation steering (Lee et al. 2024, arXiv 2409.05907).

On the prompt pass, the gate reads the last prompt token at `resid_pre.condition_layer` and scores
it by cosine with a condition direction; rows scoring above `threshold` get `alpha * r` added at
`resid_pre.layer` on every position of that pass and of every generated token. Rows below the
threshold are returned untouched (`torch.where` keeps their values bit for bit), and when no row
crosses, the hook changes nothing at all.

The gate decides on each forward whose sequence length exceeds 1 (a prompt pass) and keeps the
decision for the single-token decode steps that follow. The last prompt token is the final
post-instruction token, where the refusal direction is extracted, and it is never padding under
left padding. Defaults come from the artefact: `direction extract` stores a calibrated condition
(layer, threshold) in its metadata; a `scan_directions` artefact needs `threshold=`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from latentguard.defenses import DEFENSES, Defense
from latentguard.defenses.steering import load_direction
from latentguard.errors import ConfigError
from latentguard.hooks import Site, hook_site
from latentguard.models import LoadedModel, arch_of, normalize_layer
from latentguard.registry import spec_config

__all__ = ["ConditionalConfig", "ConditionalDefense", "Gate", "conditional_addition"]


@dataclass
class ConditionalConfig:
    layer: int | None = field(default=None, metadata={"help": "layer of the steering direction and its addition (default: the artefact's)"})
    alpha: float = field(default=1.0, metadata={"help": "coefficient on the raw direction when the gate opens (+1 induces refusal)"})
    threshold: float | None = field(default=None, metadata={"help": "steer rows whose condition cosine exceeds this (default: the artefact's calibrated one)"})
    condition_layer: int | None = field(default=None, metadata={"help": "layer whose block input the gate reads (default: the artefact's condition layer)"})
    condition: str | None = field(default=None, metadata={"help": "direction artefact for the gate (default: the steering artefact)"})
    any_model: bool = field(default=False, metadata={"help": "apply directions built on another model of the same shapes, with a warning"})

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise ConfigError(f"alpha={self.alpha} is not finite; pass a finite number.")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ConfigError(f"threshold={self.threshold}; a cosine threshold lies in [-1, 1].")


@dataclass
class Gate:
    """The current decision: per-row cosine scores and which rows are steered."""

    threshold: float
    scores: Tensor | None = None
    open: Tensor | None = None

    def decide(self, x: Tensor, unit: Tensor) -> None:
        last = x[:, -1].to(unit.dtype)
        self.scores = torch.nn.functional.cosine_similarity(last, unit[None], dim=-1).detach().cpu()
        self.open = (self.scores > self.threshold).to(x.device)


@contextlib.contextmanager
def conditional_addition(
    model: nn.Module,
    vector: Float[Tensor, " d_model"],
    layer: int,
    condition: Float[Tensor, " d_model"],
    condition_layer: int,
    threshold: float,
    alpha: float = 1.0,
) -> Iterator[Gate]:
    """Add `alpha * vector` at `resid_pre.layer` only to rows whose prompt crosses the gate; yields the Gate."""
    n_layers = len(arch_of(model).layer_list(model))
    layer, condition_layer = normalize_layer(layer, n_layers), normalize_layer(condition_layer, n_layers)
    if condition_layer > layer:
        raise ConfigError(
            f"condition_layer={condition_layer} comes after the steering layer {layer}, so the gate would decide too late; "
            f"use condition_layer <= {layer}."
        )
    for name, v in (("alpha", torch.as_tensor(alpha)), ("direction", vector), ("condition", condition)):
        if not bool(torch.isfinite(v).all()):
            raise ConfigError(f"{name} is not finite; pass finite values.")
    if float(condition.norm()) == 0:
        raise ConfigError("The condition direction is zero; pass a non-zero direction.")
    ref = next(model.parameters())
    unit = (condition.double() / condition.double().norm()).to(ref.device, torch.float32)
    add = (alpha * vector.detach().double()).to(ref.device, ref.dtype)
    gate = Gate(threshold)

    def read(x: Tensor) -> None:
        if x.shape[1] > 1 or gate.open is None or gate.open.shape[0] != x.shape[0]:
            gate.decide(x, unit)

    def steer(x: Tensor) -> Tensor | None:
        if gate.open is None or not bool(gate.open.any()):
            return None
        return torch.where(gate.open[:, None, None], x + add, x)

    handles: list[RemovableHandle] = []
    try:
        handles.append(hook_site(model, Site("resid_pre", condition_layer), read))
        handles.append(hook_site(model, Site("resid_pre", layer), steer))
        yield gate
    finally:
        for h in handles:
            h.remove()


def _parse(params: dict[str, str]) -> ConditionalConfig:
    return cast(ConditionalConfig, spec_config(ConditionalConfig, params, "conditional"))


@DEFENSES.register("conditional")
@dataclass
class ConditionalDefense(Defense):
    """Steer with `alpha * r` only when the prompt's condition cosine crosses the threshold."""

    key = "conditional"
    direction: Tensor
    condition_direction: Tensor
    layer: int
    condition_layer: int
    threshold: float
    config: ConditionalConfig
    artefact: str
    fingerprint: str

    @classmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], loaded: LoadedModel) -> Defense:
        if artefact is None:
            raise ConfigError("Defence 'conditional' needs a direction artefact: conditional:DIR (from `latentguard direction extract`).")
        cfg = _parse(params)
        direction, layer, art = load_direction(artefact, loaded, cfg.layer, cfg.any_model)
        stored = art.meta.get("condition") or {}
        cond_layer = cfg.condition_layer if cfg.condition_layer is not None else stored.get("layer", layer)
        cond_layer = normalize_layer(int(cond_layer), loaded.info.n_layers)
        threshold = cfg.threshold if cfg.threshold is not None else stored.get("threshold")
        if threshold is None:
            raise ConfigError(f"{artefact} stores no calibrated condition; pass threshold=COSINE (and condition_layer=).")
        cond, _, _ = load_direction(cfg.condition or artefact, loaded, cond_layer, cfg.any_model)
        cfg.layer, cfg.condition_layer, cfg.threshold = layer, cond_layer, float(threshold)
        fp = art.meta.get("model", {}).get("fingerprint", "")
        return cls(direction, cond, layer, cond_layer, float(threshold), cfg, artefact, fp)

    def apply(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return self._applied(model)

    @contextlib.contextmanager
    def _applied(self, model: nn.Module) -> Iterator[None]:
        with conditional_addition(model, self.direction, self.layer, self.condition_direction, self.condition_layer,
                                  self.threshold, self.config.alpha):
            yield

    def describe(self) -> dict[str, Any]:
        return {"defense": self.key, "artefact": self.artefact, "artefact_fingerprint": self.fingerprint, **asdict(self.config)}
