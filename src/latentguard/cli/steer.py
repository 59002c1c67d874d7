"""`latentguard steer pas`: fit a PAS head lock to one subject's questionnaire answers (defenses/pas.py).

Writes OUT/lock (a `headlock` artefact, method "pas", default α = the one chosen on validation items;
use it as `--defense pas:OUT/lock`) and OUT/pas.json (validation and test Likert error per α).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from latentguard.artifacts import staged_dir, write_json
from latentguard.cli.options import build_config, config_options
from latentguard.defenses.pas import PasConfig, answers_from_profile, fit_pas, read_answers
from latentguard.errors import OutputExistsError
from latentguard.models import load_model

__all__ = ["PasRunConfig", "command", "run_pas"]


@dataclass
class PasRunConfig(PasConfig):
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    out: str = field(default="out/pas", metadata={"help": "output directory (lock/ and pas.json)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (file or string) overriding the tokenizer's"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto"})


def run_pas(cfg: PasRunConfig) -> tuple[Path, dict[str, Any]]:
    """Fit PAS for the subject given by `--answers` or `--profile`; returns (out, report)."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    answers = read_answers(cfg.answers) if cfg.answers else answers_from_profile(cfg.profile)
    loaded = load_model(cfg.model, device=cfg.device, chat_template=cfg.chat_template)
    result = fit_pas(loaded, answers, cfg)
    report = {**result.report, "subject": cfg.answers or cfg.profile, "model": loaded.info.as_meta()}
    with staged_dir(out, overwrite=cfg.overwrite) as tmp:
        result.lock.save(tmp / "lock", loaded.info)
        write_json(tmp / "pas.json", report)
    return out, report


@click.group("steer")
def command() -> None:
    """Optimised steering methods that write a defence artefact."""


@command.command("pas")
@config_options(PasRunConfig)
def pas(config_file: str | None, **flags: Any) -> int:
    """PAS: per-head shift fitted to one subject's answers, alpha searched on held-out items."""
    cfg = build_config(PasRunConfig, config_file, flags)
    out, rep = run_pas(cfg)
    for c in rep["curve"]:
        click.echo(f"alpha {c['alpha']:>5g}: val error {c['val']['total']:.3f}, test error {c['test']['total']:.3f}")
    click.echo(f"chosen alpha {rep['chosen_alpha']:g}; wrote {out}/lock, {out}/pas.json")
    click.echo(f"use: --defense pas:{out}/lock")
    return 0
