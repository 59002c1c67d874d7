"""`mllr`: module-wise learning rates from module robustness (ML-LR, Du et al. 2024; spec
shared/specs/ml_lr.md — a RECONSTRUCTION: every default here is a low-confidence placeholder).

Before training, the vanilla model's units (projection role × layer group) are scored by the
security-proxy drift of `directions.modules` (or read from `--mllr-scores`, an artefact of
`latentguard analyze modules`); the robust set S trains at the base learning rate η and every
other unit at λ·η (`split`, the spec), or each unit at a rate graded by its robustness rank
(`graded`). λ = 0 freezes the non-robust units. Parameters outside every unit (embeddings,
norms, lm_head under --full) take λ·η; a LoRA parameter outside every unit is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from latentguard.artifacts import Artifact
from latentguard.directions.modules import (
    ARTIFACT_KIND,
    ModuleScoreConfig,
    Unit,
    module_data_from_splits,
    score_modules,
    unit_modules,
)
from latentguard.errors import ConfigError
from latentguard.models import LoadedModel
from latentguard.training.config import TrainConfig
from latentguard.training.methods.base import TrainingMethod
from latentguard.training.methods.registry import METHODS
from latentguard.training.trainer import live_loaded, tapped_model

__all__ = ["MLLRConfig", "MLLRMethod", "lr_multipliers"]

_MAPPINGS = ("split", "graded")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class MLLRConfig(TrainConfig):
    mllr_scores: str | None = field(default=None, metadata=_h(
        "module_scores artefact (latentguard analyze modules); default: scored on the model before training"))
    mllr_lambda: float = field(default=0.1, metadata=_h("LR multiplier of the non-robust units (0 freezes them)"))
    mllr_mapping: str = field(default="split", metadata=_h(
        "split (robust set at lr, the rest at lambda*lr: the spec) or graded (lr*lambda**(rank/(n-1)) by robustness)"))
    mllr_invert: bool = field(default=False, metadata=_h("control run: the least robust units get the full rate"))
    mllr_module_types: str = field(default="q,k,v,o", metadata=_h("[scoring] projection roles forming units"))
    mllr_layer_group: int | None = field(default=None, metadata=_h("[scoring] layers per unit (default ceil(L/8))"))
    mllr_proxy_layers: str | None = field(default=None, metadata=_h("[scoring] probe layers (default L/2, 3L/4, L-1)"))
    mllr_eps: float = field(default=0.05, metadata=_h("[scoring] relative noise of the perturb scorer"))
    mllr_seeds: int = field(default=2, metadata=_h("[scoring] noise seeds per evaluation"))
    mllr_tau: float = field(default=0.25, metadata=_h("[scoring] search threshold tau"))
    mllr_max_evals: int = field(default=32, metadata=_h("[scoring] joint evaluations in the search"))
    mllr_n_fit: int = field(default=128, metadata=_h("[scoring] prompts per class to fit the probes"))
    mllr_n_val: int = field(default=32, metadata=_h("[scoring] held-out prompts per class (the drift set E)"))
    mllr_min_probe_acc: float = field(default=0.95, metadata=_h("[scoring] held-out accuracy a probe layer needs"))

    def __post_init__(self) -> None:
        if not math.isfinite(self.mllr_lambda) or not 0 <= self.mllr_lambda <= 1:
            raise ConfigError(f"mllr_lambda={self.mllr_lambda}; use a value in [0, 1] (0 freezes the non-robust units).")
        if self.mllr_mapping not in _MAPPINGS:
            raise ConfigError(f"mllr_mapping={self.mllr_mapping!r}; use one of {', '.join(_MAPPINGS)}.")
        if self.mllr_mapping == "graded" and self.mllr_lambda == 0:
            raise ConfigError("mllr_mapping=graded needs mllr_lambda > 0 (the slowest unit trains at lambda*lr).")
        if self.mllr_scores is None and self.data_dir is None:
            raise ConfigError("ML-LR has no score source: pass --mllr-scores DIR (latentguard analyze modules) or the shared "
                              "data folder (--data-dir, LATENTGUARD_SHARED_DATA) for the probe prompts.")
        if self.mllr_scores is not None and not Path(self.mllr_scores).is_dir():
            raise ConfigError(f"--mllr-scores {self.mllr_scores} is not a directory; pass the --out of latentguard analyze modules.")
        self.score_config()  # validates the scoring fields
        super().__post_init__()

    def score_config(self) -> ModuleScoreConfig:
        return ModuleScoreConfig(
            proxy_layers=self.mllr_proxy_layers, module_types=self.mllr_module_types, layer_group=self.mllr_layer_group,
            perturb_eps=self.mllr_eps, seeds=self.mllr_seeds, tau=self.mllr_tau, max_evals=self.mllr_max_evals,
            min_probe_acc=self.mllr_min_probe_acc, seed=self.seed,
        )


def lr_multipliers(drift: dict[str, float], robust: set[str], lam: float, mapping: str = "split",
                   invert: bool = False) -> dict[str, float]:
    """Unit name -> LR multiplier. `split`: robust 1, rest λ; `graded`: λ**(rank/(n−1)), most robust rank 0.

    `invert` (control): the |S| least robust units get 1 (split) or the ranking is reversed (graded).
    """
    names = sorted(drift, key=lambda n: (drift[n], n), reverse=invert)  # most robust first (least, if inverted)
    if mapping == "split":
        top = set(names[: len(robust)]) if invert else robust
        return {n: 1.0 if n in top else lam for n in drift}
    if mapping == "graded":
        last = max(1, len(names) - 1)
        return {n: lam ** (i / last) for i, n in enumerate(names)}
    raise ConfigError(f"mapping={mapping!r}; use one of {', '.join(_MAPPINGS)}.")


@METHODS.register("mllr")
class MLLRMethod(TrainingMethod):
    """Per-unit learning rates: robust modules at lr, the rest at lambda*lr (optimizer param groups)."""

    config_cls = MLLRConfig
    config: MLLRConfig

    def __init__(self, config: TrainConfig) -> None:
        if not isinstance(config, MLLRConfig):
            raise ConfigError("The mllr method needs an MLLRConfig; build the config with METHODS.get('mllr').config_cls.")
        super().__init__(config)
        self._loaded: LoadedModel | None = None
        self.scores: Artifact | None = None
        self.multipliers: dict[str, float] = {}

    def setup(self, loaded: LoadedModel) -> None:
        if self.config.world_size > 1 and self.config.mllr_scores is None:
            raise ConfigError("Under several processes every rank must use the same robust set: score once with "
                              "`latentguard analyze modules` and pass --mllr-scores DIR.")
        self._loaded = loaded

    def prepare(self, model: nn.Module, dataset: Any, collate: Any) -> Artifact:
        """Scores of the vanilla model (computed here, or read from --mllr-scores) and the multipliers."""
        if self._loaded is None:
            raise ConfigError("MLLRMethod.setup(loaded) was not called; run it through latentguard.training.train.")
        cfg = self.config
        if cfg.mllr_scores:
            art = Artifact.load(cfg.mllr_scores, expect=ARTIFACT_KIND, model=self._loaded.info)
        else:
            data = module_data_from_splits(Path(str(cfg.data_dir)) / "refusal_direction_splits", cfg.mllr_n_fit,
                                           cfg.mllr_n_val, cfg.seed)
            loaded = live_loaded(model, self._loaded)
            art = score_modules(loaded, data, cfg.score_config())
        self._use_scores(art)
        art.meta["multipliers"] = self.multipliers
        art.meta["lr"] = self._lr_settings()
        return art

    def _lr_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {"base": cfg.learning_rate, "lambda": cfg.mllr_lambda, "mapping": cfg.mllr_mapping, "invert": cfg.mllr_invert}

    def _use_scores(self, artifact: Artifact) -> None:
        units = artifact.meta["units"]
        drift = {u["name"]: float(u["drift"]) for u in units}
        robust = {u["name"] for u in units if u["robust"]}
        self.scores = artifact
        cfg = self.config
        self.multipliers = lr_multipliers(drift, robust, cfg.mllr_lambda, cfg.mllr_mapping, cfg.mllr_invert)

    def restore(self, artifact: Artifact) -> None:
        """On resume: the multipliers the run started with; other ML-LR flags than the run's are an error."""
        saved = artifact.meta.get("lr") or {}
        now = self._lr_settings()
        changed = [k for k in ("lambda", "mapping", "invert") if k in saved and saved[k] != now[k]]
        if changed:
            was = ", ".join(f"mllr_{k}={saved[k]} (now {now[k]})" for k in changed)
            raise ConfigError(f"This run started with {was}, recorded in its method/meta.json; resume with the "
                              "same --mllr-* settings or start a new --out.")
        self._use_scores(artifact)
        if "multipliers" in artifact.meta:
            self.multipliers = {k: float(v) for k, v in artifact.meta["multipliers"].items()}

    def _units(self) -> list[Unit]:
        if self.scores is None:
            raise ConfigError("ML-LR has no module scores yet; prepare() or restore() must run before the optimizer.")
        return [Unit(u["role"], tuple(u["layers"])) for u in self.scores.meta["units"]]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        base = tapped_model(model)
        rate: dict[int, float] = {}
        for unit in self._units():
            for module in unit_modules(base, unit):
                for p in module.parameters():
                    if p.requires_grad:
                        rate[id(p)] = self.multipliers[unit.name]
        lam = self.config.mllr_lambda
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) not in rate and "lora_" in name:
                raise ConfigError(f"LoRA parameter {name} belongs to no ML-LR unit; add its type to --mllr-module-types "
                                  "or drop it from --lora targets.")
            mult = rate.get(id(p), lam)
            if mult == 0:
                p.requires_grad_(False)  # λ = 0: the limit case, frozen
                continue
            groups.setdefault(mult, []).append(p)
        lr = self.config.learning_rate
        return [{"params": ps, "lr": lr * m, "lg_multiplier": m} for m, ps in sorted(groups.items(), reverse=True)]
