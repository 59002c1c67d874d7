"""`ablate:DIR`: white-box refusal-direction ablation (Arditi et al. 2024; refusal_direction.md §6).

The attacker projects the refusal direction out of every block input and attention/MLP output,
reusing `defenses.steering`'s ablation with a direction artefact from `latentguard direction
extract` (or `scan`). As an attack it transforms the model while it generates; the defences of
the matrix column are applied on top of it (inside its hooks).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from torch import nn

from latentguard.attacks import ATTACKS, Attack, AttackContext, attack_config
from latentguard.defenses.steering import AblateDefense

__all__ = ["AblateAttack", "AblateAttackConfig"]


@dataclass
class AblateAttackConfig:
    layer: int | None = field(default=None, metadata={"help": "layer of the direction (default: the artefact's chosen layer)"})
    any_model: bool = field(default=False, metadata={"help": "ablate a direction built on another model of the same shapes "
                                                             "(e.g. the base of this fine-tune), with a warning"})


@ATTACKS.register("ablate")
class AblateAttack(Attack):
    """`ablate:DIR[,layer=L][,any_model=1]`: DIR is a refusal_direction (or scan_directions) artefact of this
    model, or, with any_model=1, of another model with the same shapes (its base, say)."""

    key = "ablate"
    usage = "ablate:DIR[,layer=L] with DIR from `latentguard direction extract` (or `scan`)"
    family = "model"
    config_cls = AblateAttackConfig
    needs_artefact = True

    def __init__(self, defense: AblateDefense, cfg: AblateAttackConfig) -> None:
        self.defense, self.cfg = defense, cfg

    @classmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], ctx: AttackContext) -> Attack:
        cfg = attack_config(cls, params)
        extra = ({} if cfg.layer is None else {"layer": str(cfg.layer)}) | ({"any_model": "1"} if cfg.any_model else {})
        return cls(cast(AblateDefense, AblateDefense.from_spec(artefact, extra, ctx.loaded)), cfg)

    def apply(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return self.defense.apply(model)

    def describe(self) -> dict[str, Any]:
        d = self.defense.describe()
        return {"attack": self.key, "artefact": d["artefact"], "artefact_fingerprint": d["artefact_fingerprint"],
                "layer": d["layer"], "config": asdict(self.cfg)}
