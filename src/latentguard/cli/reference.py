"""`latentguard reference build`: the aligned / aligned-IFT / aligned-harmful-FT reference models;
`latentguard reference pairs`: safety preference pairs for `train --method dpo|fpo`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from latentguard.cli.options import build_config, config_options
from latentguard.eval.datasets import shared_data_dir
from latentguard.training.pairs import PairsConfig, build_safety_pairs
from latentguard.training.reference import ReferenceConfig, build_references

__all__ = ["command"]


@click.group("reference")
def command() -> None:
    """Reference models: the safety-aligned embedded model and its IFT / harmful-FT variants."""


@command.command("build")
@config_options(ReferenceConfig)
def build(config_file: str | None, **flags: Any) -> int:
    """Build refs/ (resumable: re-run the same command to continue); see docs/training.md."""
    cfg = build_config(ReferenceConfig, config_file, flags)
    data = Path(cfg.data_dir) if cfg.data_dir else shared_data_dir()
    out = build_references(cfg, data, log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out}/aligned, {out}/aligned-ift, {out}/aligned-harmfulft (build.json has timings)")
    return 0


@command.command("pairs")
@config_options(PairsConfig)
def pairs(config_file: str | None, **flags: Any) -> int:
    """Safety preference pairs (prompt, chosen, rejected) from the shared data and the model's own replies."""
    cfg = build_config(PairsConfig, config_file, flags)
    data = Path(cfg.data_dir) if cfg.data_dir else shared_data_dir()
    out = build_safety_pairs(cfg, data, log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out} and {out.with_suffix('.manifest.json')}")
    return 0
