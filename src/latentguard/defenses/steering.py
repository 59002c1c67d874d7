"""Steering along a diff-in-means direction: `add` (activation addition) and `ablate`.

Both read a direction artefact: `refusal_direction` (one chosen direction with its layer)
or `scan_directions` (one direction per layer, from `latentguard scan`; pick `layer=`).
Addition uses the raw, unnormalised direction (refusal_direction.md §9.6); ablation its unit
vector at every block input and sub-module output (§6).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from latentguard.artifacts import Artifact
from latentguard.defenses import DEFENSES, Defense
from latentguard.errors import ConfigError
from latentguard.hooks import add_vectors, project_out
from latentguard.models import LoadedModel, normalize_layer
from latentguard.registry import spec_config

__all__ = ["AblateDefense", "AddDefense", "SteerConfig", "load_direction"]

DIRECTION_KINDS = ("refusal_direction", "scan_directions")


@dataclass
class SteerConfig:
    layer: int | None = field(default=None, metadata={"help": "layer of the direction (and of addition); default: the artefact's chosen/best layer"})
    alpha: float = field(default=1.0, metadata={"help": "coefficient on the raw direction for `add` (+1 induces refusal)"})
    any_model: bool = field(default=False, metadata={"help": "apply a direction built on another model of the same shapes "
                                                             "(e.g. the base of this fine-tune), with a warning"})

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise ConfigError(f"alpha={self.alpha} is not finite; pass a finite number.")


def load_direction(path: str, loaded: LoadedModel, layer: int | None, any_model: bool = False) -> tuple[Tensor, int, Artifact]:
    """(raw direction [d], layer, artefact) from a direction artefact, checked against the model: same shapes
    always; the same fingerprint unless `any_model` (a direction of the base applied to its fine-tune)."""
    art = Artifact.load(path, model=loaded.info, allow_fingerprint_mismatch=any_model)
    if art.kind not in DIRECTION_KINDS:
        raise ConfigError(f"{path} is a {art.kind!r} artefact; steering needs one of {DIRECTION_KINDS}.")
    n_layers = loaded.info.n_layers
    if art.kind == "refusal_direction":
        default = int(art.meta["layer"])
        l = normalize_layer(layer if layer is not None else default, n_layers)
        if l == default:
            return art.tensors["direction"].float(), l, art
        if "candidates" not in art.tensors:  # `direction extract` keeps every candidate [P, L, d]
            raise ConfigError(f"{path} holds one direction, from layer {default}; drop layer= or pass a scan artefact.")
        return art.tensors["candidates"][int(art.meta["position_index"]), l].float(), l, art
    l = normalize_layer(layer if layer is not None else int(art.meta["best_layer"]), n_layers)
    return art.tensors["directions"][l].float(), l, art


def _parse(params: dict[str, str]) -> SteerConfig:
    return cast(SteerConfig, spec_config(SteerConfig, params, "steering"))


@dataclass
class _DirectionDefense(Defense):
    direction: Tensor
    layer: int
    config: SteerConfig
    artefact: str
    fingerprint: str

    @classmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], loaded: LoadedModel) -> Defense:
        if artefact is None:
            raise ConfigError(f"Defence {cls.key!r} needs a direction artefact: {cls.key}:DIR (from `latentguard scan` or `direction extract`).")
        cfg = _parse(params)
        direction, layer, art = load_direction(artefact, loaded, cfg.layer, cfg.any_model)
        cfg.layer = layer
        return cls(direction, layer, cfg, artefact, art.meta.get("model", {}).get("fingerprint", ""))

    def describe(self) -> dict[str, Any]:
        return {"defense": self.key, "artefact": self.artefact, "artefact_fingerprint": self.fingerprint, **asdict(self.config)}


@DEFENSES.register("add")
class AddDefense(_DirectionDefense):
    """x <- x + alpha * r at `resid_pre.layer`, every position (activation addition)."""

    key = "add"

    def apply(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return add_vectors(model, {f"resid_pre.{self.layer}": self.direction}, alpha=self.config.alpha)


@DEFENSES.register("ablate")
class AblateDefense(_DirectionDefense):
    """x <- x - r̂ r̂ᵀx at every block input and attention/MLP output (directional ablation)."""

    key = "ablate"

    def apply(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return project_out(model, self.direction.to(torch.float64))
