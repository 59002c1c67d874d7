"""`latentguard eval`: generate on harmful / over-refusal / utility sets, judge, summarise.

Flags come from `EvalConfig` plus every field of every registered judge's config
(`--judge-url`, `--judge-model`, `--keyword-mode`, `--direction-path`, ...); a judge flag is
only accepted when its judge is in `--judge`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from latentguard.cli.options import build_config, config_options, field_option
from latentguard.eval.judges import JUDGES
from latentguard.eval.runner import EvalConfig, run_eval

__all__ = ["command"]

F = TypeVar("F", bound=Callable[..., Any])


def _judge_fields() -> list[tuple[str, dataclasses.Field[Any], Any]]:
    """(judge, field, type) for each judge config field not already an EvalConfig field."""
    seen = {f.name for f in dataclasses.fields(EvalConfig)}
    out = []
    for name in JUDGES.names():
        cls = JUDGES.get(name).config_cls
        hints = typing.get_type_hints(cls)
        for fld in dataclasses.fields(cls):
            if fld.name not in seen:
                seen.add(fld.name)
                out.append((name, fld, hints[fld.name]))
    return out


def _judge_options(f: F) -> F:
    for judge, fld, tp in reversed(_judge_fields()):
        f = field_option(fld.name, tp, f"[{judge} judge] {fld.metadata.get('help', '')}")(f)
    return f


@click.command("eval")
@config_options(EvalConfig)
@click.option("--defense", "defense", multiple=True,
              help="defence spec NAME[:ARTEFACT][,k=v]; repeat to compose; one value listing several specs "
                   "(none,add:DIR,alpha=2,lock:L) gives attack x defence matrix columns ('+' composes inside one)")
@_judge_options
def command(config_file: str | None, defense: tuple[str, ...], **flags: Any) -> int:
    """Evaluate a model (with defences): harmful rate, over-refusal and utility; resumable."""
    judge_flags = {fld.name: flags.pop(fld.name) for _, fld, _ in _judge_fields()}
    flags["defense"] = list(defense) or None
    cfg = build_config(EvalConfig, config_file, flags)
    cfg.judge_options = {**cfg.judge_options, **{k: v for k, v in judge_flags.items() if v is not None}}
    out = run_eval(cfg)
    click.echo(f"wrote {out}/summary.json, {out}/generations.jsonl, {out}/judgements.jsonl, {out}/run.json")
    click.echo(f"report: {(out / 'report.html').resolve()}")
    return 0
