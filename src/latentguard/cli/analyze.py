"""`latentguard analyze lens --model SPEC --prompt TEXT`: logit lens per layer and position, as HTML."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from latentguard.artifacts import git_commit, staged_dir, write_json
from latentguard.cli._report import render_lens_report
from latentguard.cli.options import build_config, config_options
from latentguard.directions.lens import LensConfig, logit_lens
from latentguard.errors import ConfigError, OutputExistsError
from latentguard.models import load_model

__all__ = ["LensRunConfig", "command", "run_lens"]


@dataclass
class LensRunConfig(LensConfig):
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    prompt: str = field(default="", metadata={"help": "the user prompt"})
    response: str | None = field(default=None, metadata={"help": "a response to append (teacher-forced) after the prompt"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (file or string) overriding the tokenizer's"})
    out: str = field(default="out/lens", metadata={"help": "output directory (lens.json, lens.html)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompt.strip():
            raise ConfigError("No prompt; pass --prompt TEXT.")


def run_lens(cfg: LensRunConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    loaded = load_model(cfg.model, chat_template=cfg.chat_template)
    lens = logit_lens(loaded, cfg.prompt, cfg, cfg.response)
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    lens["created_utc"] = created
    with staged_dir(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "lens.json", lens)
        (tmp / "lens.html").write_text(render_lens_report(lens, created, git_commit()))
    return out


@click.group("analyze")
def command() -> None:
    """Analyses of hidden states: the logit lens."""


@command.command("lens")
@config_options(LensRunConfig)
def lens(config_file: str | None, **flags: Any) -> int:
    """Top-k tokens and refusal-token probability per layer and position (logit lens), as an HTML heat map."""
    cfg = build_config(LensRunConfig, config_file, flags)
    out = run_lens(cfg)
    click.echo(f"wrote {out}/lens.json, {out}/lens.html")
    return 0
