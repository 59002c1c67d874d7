"""`latentguard drift --base SPEC --tuned SPEC [--tuned SPEC ...] [--direction DIR]`.

Per-layer cosine between base and tuned refusal directions, projection shifts onto the base
direction and the refusal proxy before/after; writes OUT/drift.json and OUT/drift.html. Pass
several `--tuned` checkpoints (in training order) for a drift curve.
"""

from __future__ import annotations

import datetime as _dt
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from latentguard import __version__
from latentguard.artifacts import Artifact, git_commit, staged_dir, write_json
from latentguard.cli._report import render_drift_report
from latentguard.cli.options import build_config, config_options
from latentguard.directions.drift import DriftConfig, class_stats, compare_stats
from latentguard.errors import ConfigError, OutputExistsError
from latentguard.eval.datasets import read_records, sample, shared_data_dir
from latentguard.models import load_model, normalize_layer

__all__ = ["DriftRunConfig", "command", "run_drift"]


@dataclass
class DriftRunConfig(DriftConfig):
    base: str = field(default="embedded", metadata={"help": "the base model spec"})
    tuned: list[str] = field(default_factory=list, metadata={"cli": False, "help": "tuned model specs (repeatable --tuned, in training order)"})
    direction: str | None = field(default=None, metadata={"help": "refusal_direction artefact of the base model (sets the summary layer and position)"})
    layer: int | None = field(default=None, metadata={"help": "summary layer without --direction (default: 60% depth)"})
    harmful: str | None = field(default=None, metadata={"help": "harmful prompts (default: refusal_direction_splits/harmful_train.json)"})
    harmless: str | None = field(default=None, metadata={"help": "harmless prompts (default: .../harmless_train.json)"})
    out: str = field(default="out/drift", metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tuned:
            raise ConfigError("No tuned model; pass --tuned SPEC (repeatable).")


def _prompts(path: str | None, default: str, cfg: DriftRunConfig) -> list[str]:
    p = Path(path) if path else shared_data_dir() / "refusal_direction_splits" / default
    return [r.prompt for r in sample(read_records(p), cfg.n, cfg.seed)]


def run_drift(cfg: DriftRunConfig) -> Path:
    """Measure drift of every tuned model against the base; returns the output directory."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    harmful, harmless = _prompts(cfg.harmful, "harmful_train.json", cfg), _prompts(cfg.harmless, "harmless_train.json", cfg)
    base = load_model(cfg.base)
    n_layers = base.info.n_layers
    direction, position, source = None, -1, "diff in means per layer"
    if cfg.direction:
        art = Artifact.load(cfg.direction, expect="refusal_direction", model=base.info)
        direction, layer, position, source = art.tensors["direction"], int(art.meta["layer"]), int(art.meta["position"]), cfg.direction
    else:
        layer = normalize_layer(cfg.layer if cfg.layer is not None else int(0.6 * n_layers), n_layers)
    base_stats = class_stats(base, harmful, harmless, cfg, position)
    result: dict[str, Any] = {
        "kind": "drift", "base": base.info.as_meta(), "settings": {k: v for k, v in cfg.__dict__.items()},
        "direction": {"source": source, "layer": layer, "position": position},
        "base_proxy": {"harmful": float(base_stats.proxy_harmful.mean()), "harmless": float(base_stats.proxy_harmless.mean())},
        "tuned": [],
    }
    del base
    for spec in cfg.tuned:
        tuned = load_model(spec)
        row = compare_stats(base_stats, class_stats(tuned, harmful, harmless, cfg, position), layer, direction)
        result["tuned"].append({"model": tuned.info.as_meta(), **row})
        del tuned
        gc.collect()
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    result.update(latentguard={"version": __version__, "commit": git_commit()}, created_utc=created)
    with staged_dir(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "drift.json", result)
        (tmp / "drift.html").write_text(render_drift_report(result, created, git_commit()))
    return out


@click.command("drift")
@config_options(DriftRunConfig)
@click.option("--tuned", "tuned", multiple=True, help="tuned model spec; repeat for a checkpoint curve")
def command(config_file: str | None, tuned: tuple[str, ...], **flags: Any) -> int:
    """How far the refusal direction moves between a base model and tuned checkpoints."""
    flags["tuned"] = list(tuned) or None
    cfg = build_config(DriftRunConfig, config_file, flags)
    out = run_drift(cfg)
    click.echo(f"wrote {out}/drift.json, {out}/drift.html")
    return 0
