"""`latentguard direction extract`: the refusal direction with the paper's selection rules.

Writes OUT/scores.json (every candidate's scores), OUT/report.html (heat maps layer × position)
and OUT/direction/ (a `refusal_direction` artefact, usable as `--defense ablate:OUT/direction`).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from latentguard import __version__
from latentguard.artifacts import git_commit, staged_dir, write_json
from latentguard.cli._report import render_direction_report
from latentguard.cli.options import build_config, config_options
from latentguard.directions.refusal import (
    RefusalData,
    RefusalDirectionConfig,
    extract_refusal_direction,
)
from latentguard.errors import OutputExistsError
from latentguard.eval.datasets import (
    dedupe_against,
    portable_path,
    read_records,
    resolve_dataset,
    sample,
    shared_data_dir,
)
from latentguard.models import load_model

__all__ = ["DEFAULT_DEDUPE", "ExtractConfig", "command", "run_extract"]

# §2: dedupe every split against the eval sets (JailbreakBench is not in the shared data).
DEFAULT_DEDUPE = "advbench-heldout,harmbench-test,xstest-safe,xstest-unsafe,rd-harmful-test,rd-harmless-test"
_SPLITS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")


@dataclass
class ExtractConfig(RefusalDirectionConfig):
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    harmful_train: str | None = field(default=None, metadata={"help": "harmful train prompts (default: refusal_direction_splits/harmful_train.json)"})
    harmless_train: str | None = field(default=None, metadata={"help": "harmless train prompts (default: .../harmless_train.json)"})
    harmful_val: str | None = field(default=None, metadata={"help": "harmful val prompts (default: .../harmful_val.json)"})
    harmless_val: str | None = field(default=None, metadata={"help": "harmless val prompts (default: .../harmless_val.json)"})
    column: str | None = field(default=None, metadata={"help": "prompt column in the data files (default: auto-detect)"})
    dedupe_against: str = field(default=DEFAULT_DEDUPE, metadata={"help": "comma list of eval data sets every split is deduplicated against ('' for none)"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (file or string) overriding the tokenizer's"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto"})
    out: str = field(default="out/direction", metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})


def _load_data(cfg: ExtractConfig) -> tuple[RefusalData, dict[str, Any]]:
    """Read, dedupe (against the eval sets and val against train) and sample the four splits (§2)."""
    others = [r.prompt for name in cfg.dedupe_against.split(",") if name.strip() for r in resolve_dataset(name.strip()).load()]
    sets: dict[str, list[str]] = {}
    info: dict[str, Any] = {"dedupe_against": cfg.dedupe_against}
    for split in _SPLITS:
        given = getattr(cfg, split)
        path = Path(given) if given else shared_data_dir() / "refusal_direction_splits" / f"{split}.json"
        records = read_records(path, cfg.column)
        train = sets.get(split.replace("_val", "_train"), []) if split.endswith("_val") else []
        kept = dedupe_against(records, others, train)
        n = cfg.n_train if split.endswith("_train") else cfg.n_val
        sets[split] = [r.prompt for r in sample(kept, n, cfg.seed)]
        info[split] = {"source": portable_path(path), "n_file": len(records), "n_after_dedupe": len(kept), "n_sampled": len(sets[split])}
    return RefusalData(**sets), info


def run_extract(cfg: ExtractConfig) -> Path:
    """Extract the refusal direction and write scores.json, report.html and direction/ to cfg.out."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:  # fail before the slow part
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    data, info = _load_data(cfg)
    loaded = load_model(cfg.model, device=cfg.device, chat_template=cfg.chat_template)
    result = extract_refusal_direction(loaded, data, cfg)
    scores = result.scores
    scores["data"].update(info)
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    scores["latentguard"] = {"version": __version__, "commit": git_commit()}
    scores["created_utc"] = created
    with staged_dir(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "scores.json", scores)
        result.artifact.meta["data"] = scores["data"]
        result.artifact.save(tmp / "direction", model=loaded.info)
        (tmp / "report.html").write_text(render_direction_report(scores, created, git_commit()))
    return out


@click.group("direction")
def command() -> None:
    """Refusal direction: extract (diff in means, scored and selected per the paper)."""


@command.command("extract")
@config_options(ExtractConfig)
def extract(config_file: str | None, **flags: Any) -> int:
    """Extract the refusal direction: candidates per layer × position, bypass/induce/KL scores, selection."""
    cfg = build_config(ExtractConfig, config_file, flags)
    out = run_extract(cfg)
    click.echo(f"wrote {out}/scores.json, {out}/direction/, {out}/report.html")
    click.echo(f"use: --defense ablate:{out}/direction (or add:, conditional:)")
    return 0
