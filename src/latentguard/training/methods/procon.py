"""`procon`: projection-constrained fine-tuning (ProCon, Du et al. 2025; spec shared/specs/procon.md).

L = CE + α_t · Σ_layers Σ_response tokens |r^(l)ᵀ x^(l)_t(θ) − z_0^(l)_t|, mean over the batch.
- r^(l): the vanilla model's unit diff-in-means refusal direction at the block input of layer l,
  last prompt token (`directions.layerwise`), computed once before training (or read from an
  artefact), frozen.
- z_0: each training token's own projection under the vanilla model, cached once per row in
  `RUN/method` (safetensors, fp32) by `prepare`, so a step needs no second forward.
- The hidden states are those of the SAME forward as the CE (`sites` = `resid_pre.l`).
- α_t: constant (`procon_alpha`, ProCon_s) or a strong warm-up (`procon_warmup_alpha` for the
  first W steps, decayed by `procon_decay`) and `procon_alpha` after it (ProCon_wu: 0); at the
  warm-up's end the optimizer state is cleared (`procon_phase_reset`).
- Broadened data (`*_safe`): `procon_safe_data` adds safety rows to `--data`; the constraint
  covers them too.
Logged per step: `procon` (α_t·L), `procon_raw` (L), `procon_alpha`, `procon_drift` (mean
|Δz| per response token over the constrained layers) and `procon_drift/<layer>`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from latentguard.artifacts import Artifact
from latentguard.directions.layerwise import (
    LayerDirections,
    extract_layer_directions,
    load_layer_directions,
)
from latentguard.errors import ArtifactError, ConfigError
from latentguard.models import LoadedModel, normalize_layer
from latentguard.training.capture import capture_live
from latentguard.training.config import TrainConfig
from latentguard.training.data import read_prompts
from latentguard.training.losses import layer_projections, projection_penalty
from latentguard.training.methods.base import TrainBatch, TrainingMethod
from latentguard.training.methods.registry import METHODS
from latentguard.training.trainer import live_loaded, tapped_model

__all__ = ["ProConConfig", "ProConMethod", "parse_layers", "procon_alpha_at", "response_positions"]

REFERENCE_KIND = "procon_reference"
_SPLITS = "refusal_direction_splits"
_DECAYS = ("step", "linear", "cosine")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ProConConfig(TrainConfig):
    procon_alpha: float = field(default=0.1, metadata=_h(
        "α on the projection penalty (ProCon_s: 0.1-0.2); with a warm-up, the α after it (ProCon_wu: 0)"))
    procon_layers: str = field(default="all", metadata=_h("constrained layers: all, last, a comma list or START:STOP"))
    procon_norm: str = field(default="abs", metadata=_h("penalty per token: abs (|Δz|, the paper) or sq (Δz², a deviation)"))
    procon_reduce: str = field(default="sum", metadata=_h(
        "sum over layers and tokens (the paper; grows with depth and length) or mean (scale-free, α vs the CE)"))
    procon_tolerance: float = field(default=1e-4, metadata=_h(
        "relative dead zone: |Δz| below tol·(1+|z0|) counts as 0 (float noise of the cached anchors; ~1e-2 under bf16)"))
    procon_positions: str = field(default="target", metadata=_h(
        "tokens constrained: target (positions of the response tokens) or predicting (one earlier)"))
    procon_warmup_steps: int = field(default=0, metadata=_h("warm-up length in optimizer steps (0 = no warm-up)"))
    procon_warmup_epochs: float = field(default=0.0, metadata=_h("warm-up length in epochs (instead of steps)"))
    procon_warmup_alpha: float = field(default=1.0, metadata=_h("α at the start of the warm-up (paper: 1 or 2)"))
    procon_decay: str = field(default="step", metadata=_h(
        "warm-up α schedule down to --procon-alpha: step (constant, then drop: the paper), linear or cosine"))
    procon_phase_reset: bool = field(default=True, metadata=_h("clear the optimizer state when the warm-up ends"))
    procon_directions: str | None = field(default=None, metadata=_h(
        "per-layer direction artefact (procon_directions, a run's method/ dir, or scan_directions)"))
    procon_harmful: str | None = field(default=None, metadata=_h(
        "harmful prompts for the directions (default: refusal_direction_splits/harmful_train.json)"))
    procon_harmless: str | None = field(default=None, metadata=_h(
        "harmless prompts for the directions (default: refusal_direction_splits/harmless_train.json)"))
    procon_n_directions: int = field(default=128, metadata=_h("prompts sampled per class for the directions"))
    procon_direction_seed: int = field(default=42, metadata=_h("seed of that sample"))
    procon_safe_data: str | None = field(default=None, metadata=_h(
        "broadened data (the *_safe variant): a --data spec of safety rows added to the mix, e.g. safety:1000"))

    def __post_init__(self) -> None:
        for name in ("procon_alpha", "procon_warmup_alpha", "procon_warmup_steps", "procon_warmup_epochs",
                     "procon_tolerance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value}; use a finite value >= 0 (0 switches the term off).")
        if self.procon_warmup_steps and self.procon_warmup_epochs:
            raise ConfigError("Both procon_warmup_steps and procon_warmup_epochs are set; give the warm-up length once.")
        for name, allowed in (("procon_norm", ("abs", "sq")), ("procon_reduce", ("sum", "mean")),
                              ("procon_positions", ("target", "predicting")),
                              ("procon_decay", _DECAYS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}; use one of {', '.join(allowed)}.")
        if self.procon_n_directions < 1:
            raise ConfigError(f"procon_n_directions={self.procon_n_directions}; use >= 1.")
        parse_layers(self.procon_layers, None)
        self._check_direction_source()
        if self.procon_safe_data:
            self.data = [*self.data, self.procon_safe_data]
        super().__post_init__()

    def _check_direction_source(self) -> None:
        if self.procon_directions:
            return
        given = [p for p in (self.procon_harmful, self.procon_harmless) if p]
        for p in given:
            if not Path(p).is_file():
                raise ConfigError(f"Direction prompt file {p} does not exist; pass an existing file.")
        if len(given) < 2 and self.data_dir is None:
            raise ConfigError(
                "ProCon has no direction source: pass --procon-directions DIR (a procon_directions artefact), "
                "--procon-harmful FILE and --procon-harmless FILE, or the shared data folder (--data-dir, "
                "LATENTGUARD_SHARED_DATA) for refusal_direction_splits."
            )

    def warmup_length(self, steps_per_epoch: int) -> int:
        if self.procon_warmup_epochs:
            return max(1, round(self.procon_warmup_epochs * steps_per_epoch))
        return self.procon_warmup_steps


def parse_layers(text: str, n_layers: int | None) -> list[int]:
    """`all`, `last`, `START:STOP[:STEP]` or `0,5,-1` -> sorted 0-based layers (checked when n_layers is known)."""
    text = text.strip().lower()
    if text in ("all", "last"):
        if n_layers is None:
            return []
        return list(range(n_layers)) if text == "all" else [n_layers - 1]
    try:
        parts = [int(p) for p in text.replace(":", ",").split(",") if p.strip()]
    except ValueError as e:
        raise ConfigError(f"procon_layers={text!r}; write all, last, START:STOP or integers separated by commas.") from e
    if not parts or (":" in text and not 2 <= len(parts) <= 3):
        raise ConfigError(f"procon_layers={text!r} names no layer; write all, last, START:STOP or 0,5,-1.")
    if n_layers is None:
        return []
    if ":" in text:
        start, stop = (normalize_layer(p, n_layers) if p < n_layers else p for p in parts[:2])
        layers = list(range(start, stop, parts[2] if len(parts) == 3 else 1))
        bad = [p for p in parts[:2] if not -n_layers <= p <= n_layers]
    else:
        layers, bad = parts, [p for p in parts if not -n_layers <= p < n_layers]
    if bad or not layers:
        raise ConfigError(f"procon_layers={text!r}: layers {bad or parts} out of range for a model with {n_layers} "
                          f"layers; use 0..{n_layers - 1} (or -{n_layers}..-1).")
    return sorted({normalize_layer(p, n_layers) for p in layers})


def procon_alpha_at(step: int, alpha: float, warmup_steps: int = 0, warmup_alpha: float = 1.0, decay: str = "step") -> float:
    """α for optimizer step `step` (0-based): the warm-up's schedule from warmup_alpha towards `alpha`, then `alpha`."""
    if step >= warmup_steps:
        return alpha
    frac = step / warmup_steps
    if decay == "step":
        return warmup_alpha
    if decay == "linear":
        return warmup_alpha + (alpha - warmup_alpha) * frac
    if decay == "cosine":
        return alpha + (warmup_alpha - alpha) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ConfigError(f"decay={decay!r}; use one of {', '.join(_DECAYS)}.")


def response_positions(labels: Tensor, positions: str = "target") -> Tensor:
    """Tokens the penalty covers: where labels carry loss (`target`) or one position earlier (`predicting`)."""
    mask = labels != -100
    if positions == "predicting":
        mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return mask


class _Schedule(TrainerCallback):
    """Keeps the method's step in sync, fixes an epoch-based warm-up length, resets the optimizer at its end."""

    def __init__(self, method: ProConMethod) -> None:
        self.method = method

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        loader = kw.get("train_dataloader")
        per_epoch = max(1, len(loader) // max(1, args.gradient_accumulation_steps)) if loader is not None else 1
        self.method.warmup_steps = self.method.config.warmup_length(per_epoch)
        self.method.step = state.global_step

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.method.step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        w, optimizer = self.method.warmup_steps, kw.get("optimizer")
        if self.method.config.procon_phase_reset and w and state.global_step == w and optimizer is not None:
            getattr(optimizer, "optimizer", optimizer).state.clear()  # phase 2 starts with a fresh AdamW


@METHODS.register("procon")
class ProConMethod(TrainingMethod):
    """Anchor each response token's projection on the vanilla per-layer refusal directions."""

    config_cls = ProConConfig
    config: ProConConfig

    def __init__(self, config: TrainConfig) -> None:
        if not isinstance(config, ProConConfig):
            raise ConfigError("The procon method needs a ProConConfig; build the config with METHODS.get('procon').config_cls.")
        super().__init__(config)
        self.step = 0
        self.warmup_steps = config.procon_warmup_steps  # an epoch-based length is fixed at train begin
        self.layers: list[int] = []
        self._loaded: LoadedModel | None = None
        self._directions: Tensor | None = None  # [L, d] unit rows, all layers
        self._selected: Tensor | None = None  # the constrained layers' rows, fp32 on the hidden states' device
        self._anchors: Tensor | None = None  # [Lc, total response tokens] fp32
        self._offsets: Tensor | None = None  # [N + 1] int64, by lg_index
        self._logged: dict[str, float] = {}

    # ------------------------------------------------------------ setup and reference statistics

    def setup(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self.layers = parse_layers(self.config.procon_layers, loaded.info.n_layers)

    def sites(self, model: nn.Module) -> list[str]:
        if self._loaded is None:
            raise ConfigError("ProConMethod.setup(loaded) was not called; run it through latentguard.training.train.")
        return [f"resid_pre.{l}" for l in self.layers]

    def callbacks(self) -> list[TrainerCallback]:
        return [_Schedule(self)]

    def _direction_source(self, model: nn.Module) -> LayerDirections:
        if self._loaded is None:
            raise ConfigError("ProConMethod.setup(loaded) was not called; run it through latentguard.training.train.")
        cfg = self.config
        if cfg.procon_directions:
            return load_layer_directions(cfg.procon_directions, self._loaded.info)
        data = Path(cfg.data_dir) / _SPLITS if cfg.data_dir else None
        paths = [cfg.procon_harmful or (data and data / "harmful_train.json"),
                 cfg.procon_harmless or (data and data / "harmless_train.json")]
        rng = random.Random(cfg.procon_direction_seed)
        sets = []
        for p in paths:
            prompts = read_prompts(str(p))
            sets.append(rng.sample(prompts, min(cfg.procon_n_directions, len(prompts))))
        loaded = live_loaded(model, self._loaded)
        dirs = extract_layer_directions(loaded, sets[0], sets[1], batch_size=max(1, cfg.per_device_train_batch_size))
        dirs.source.update(harmful=str(paths[0]), harmless=str(paths[1]), seed=cfg.procon_direction_seed)
        return dirs

    @torch.no_grad()
    def prepare(self, model: nn.Module, dataset: Any, collate: Any) -> Artifact:
        """Directions of the vanilla model, then every training token's reference projection (one pass)."""
        dirs = self._direction_source(model)
        self._directions, self._selected = dirs.directions, None
        per_row: dict[int, Tensor] = {}
        for index, z, mask in self._passes(model, dataset, collate):
            for b, i in enumerate(index):
                per_row[i] = z[:, b, mask[b]].float().cpu()
        # rows trl dropped (e.g. fully masked after truncation) keep an empty slot, so lg_index stays the key
        n_rows = max(per_row, default=-1) + 1
        empty = torch.zeros(len(self.layers), 0)
        counts = torch.tensor([0] + [per_row[i].shape[1] if i in per_row else 0 for i in range(n_rows)])
        self._offsets = counts.cumsum(0)
        self._anchors = torch.cat([per_row.get(i, empty) for i in range(n_rows)], dim=1)
        return Artifact(
            kind=REFERENCE_KIND,
            tensors={"directions": self._directions, "anchors": self._anchors, "offsets": self._offsets},
            meta={"layers": self.layers, "positions": self.config.procon_positions, "norm": self.config.procon_norm,
                  "site": "resid_pre", "anchor": "cache", "anchor_dtype": "float32", "rows": len(per_row),
                  "tolerance": self.config.procon_tolerance,
                  "tokens": int(self._offsets[-1]), "zero_layers": dirs.zero_layers, "directions_source": dirs.source},
        )

    def restore(self, artifact: Artifact) -> None:
        if artifact.kind != REFERENCE_KIND or artifact.meta.get("layers") != self.layers:
            raise ArtifactError(f"The run's method/ artefact ({artifact.kind}, layers {artifact.meta.get('layers')}) does not "
                                f"match procon with layers {self.layers}; resume with the same settings or a new --out.")
        t = artifact.tensors
        self._directions, self._anchors, self._offsets = t["directions"], t["anchors"], t["offsets"]
        self._selected = None

    # ------------------------------------------------------------ loss

    def _project(self, hidden: dict[str, Tensor]) -> Tensor:
        if self._directions is None:
            raise ConfigError("ProCon has no directions yet; prepare() or restore() must run before training.")
        states = [hidden[f"resid_pre.{l}"] for l in self.layers]
        dev = states[0].device
        if self._selected is None or self._selected.device != dev:  # the constrained rows, once per device
            self._selected = self._directions[self.layers].float().to(dev)
        return layer_projections(states, self._selected)

    def reference(self, index: list[int], mask: Tensor) -> Tensor:
        """z_0 laid out like the batch: [Lc, B, T], zero outside `mask`."""
        if self._anchors is None or self._offsets is None:
            raise ConfigError("ProCon has no cached anchors; prepare() or restore() must run before training.")
        counts = mask.sum(1).tolist()
        rows = []
        for b, i in enumerate(index):
            lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
            if hi - lo != counts[b]:
                raise ArtifactError(
                    f"Row {i} has {counts[b]} constrained tokens but {hi - lo} cached anchors: the tokenisation changed "
                    "since prepare(); start a new run (--overwrite) instead of resuming."
                )
            rows.append(self._anchors[:, lo:hi])
        ref = torch.zeros((len(self.layers), *mask.shape), dtype=torch.float32, device=mask.device)
        ref[:, mask] = torch.cat(rows, dim=1).to(mask.device)
        return ref

    def alpha(self) -> float:
        c = self.config
        return procon_alpha_at(self.step, c.procon_alpha, self.warmup_steps, c.procon_warmup_alpha, c.procon_decay)

    def loss_terms(self, hidden: dict[str, Tensor], batch: TrainBatch, model: nn.Module) -> dict[str, Tensor]:
        mask = response_positions(batch.labels, self.config.procon_positions)
        alpha = self.alpha()
        with torch.set_grad_enabled(alpha > 0 and torch.is_grad_enabled()):
            z = self._project(hidden)
            ref = self.reference([int(i) for i in batch.index.tolist()], mask)
            raw = projection_penalty(z, mask, ref, self.config.procon_norm, self.config.procon_tolerance,
                                     self.config.procon_reduce)
        self._log(z.detach(), ref, mask, float(raw.detach()), alpha)
        return {"procon": alpha * raw if alpha > 0 else raw.detach() * 0.0}

    def _log(self, z: Tensor, ref: Tensor, mask: Tensor, raw: float, alpha: float) -> None:
        drift = (z - ref).abs()[:, mask].mean(dim=1) if bool(mask.any()) else torch.zeros(len(self.layers))
        self._logged = {"procon_raw": raw, "procon_alpha": alpha, "procon_drift": float(drift.mean())}
        self._logged.update({f"procon_drift/{l}": float(d) for l, d in zip(self.layers, drift.tolist(), strict=True)})

    def metrics(self) -> dict[str, float]:
        out, self._logged = self._logged, {}
        return out

    def _passes(self, model: nn.Module, dataset: Any, collate: Any) -> Iterator[tuple[list[int], Tensor, Tensor]]:
        """(row ids, projections [Lc, B, T], constrained-token mask) per batch of the training set, in order."""
        device = next(model.parameters()).device
        size = max(1, self.config.per_device_train_batch_size)
        for start in range(0, len(dataset), size):
            batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            index = [int(i) for i in batch.pop("lg_index").tolist()]
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}
            with capture_live(tapped_model(model), self.sites(model)) as hidden:
                model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")})
            yield index, self._project(hidden), response_positions(batch["labels"], self.config.procon_positions)

    @torch.no_grad()
    def drift(self, model: nn.Module, dataset: Any, collate: Any) -> Tensor:
        """Mean |z − z_0| per constrained layer over every training token, under `model`'s current weights."""
        total, count = torch.zeros(len(self.layers), dtype=torch.float64), 0
        for index, z, mask in self._passes(model, dataset, collate):
            delta = (z - self.reference(index, mask)).abs()[:, mask]
            total += delta.double().sum(1).cpu()
            count += delta.shape[1]
        return (total / max(1, count)).float()
