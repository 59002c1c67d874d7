"""`latentguard attack radial`: RADIAL's inherent-response-tendency ranking and attack prompts.

Writes OUT/ranking/ (a `radial_ranking` artefact, usable as `--attack radial:OUT` in eval),
OUT/instructions.json (chosen instructions with scores, score distribution, set sizes),
OUT/scores.jsonl (every pool instruction, ranked), OUT/prompts.jsonl (one attack prompt per
harmful request and k, with its follow-up turn) and OUT/radial.json (settings, timings).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import click

from latentguard import __version__
from latentguard.artifacts import git_commit, staged_dir, write_json
from latentguard.attacks.pool import load_pool
from latentguard.attacks.radial import RadialConfig, RadialRanking, build_prompts, rank_instructions
from latentguard.attacks.tendency import BOTTOM_CUTOFF, TOP_CUTOFF, tendency_scores
from latentguard.cli.options import build_config, config_options
from latentguard.errors import ConfigError, OutputExistsError
from latentguard.eval.datasets import read_prompts, resolve_dataset, shared_data_dir
from latentguard.models import load_model

__all__ = ["RadialRunConfig", "command", "run_radial"]


@dataclass
class RadialRunConfig(RadialConfig):
    k: int = field(default=2, metadata={"cli": False, "help": "(eval only; the CLI writes every k of --ks)"})
    ks: str = field(default="2,4", metadata={"help": "comma list of k: one attack per k (paper: A = 2, B = 4)"})
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    targets: str = field(default="advbench-heldout", metadata={"help": "harmful requests to build prompts for: a data set name or PATH[:COLUMN]"})
    limit: int | None = field(default=100, metadata={"help": "seeded sample of N harmful requests (default 100, as the paper)"})
    system: str | None = field(default=None, metadata={"help": "system prompt; default: the chat template's own (keep it equal to the eval's)"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (file or string) overriding the tokenizer's"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto"})
    show: int = field(default=20, metadata={"help": "top and bottom instructions listed in instructions.json"})
    out: str = field(default="out/radial", metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.k_list():
            raise ConfigError(f"ks={self.ks!r}; pass a comma list of positive integers such as 2,4.")

    def k_list(self) -> list[int]:
        try:
            ks = [int(x) for x in self.ks.split(",") if x.strip()]
        except ValueError as e:
            raise ConfigError(f"ks={self.ks!r}; pass a comma list of positive integers such as 2,4.") from e
        if any(k < 1 for k in ks):
            raise ConfigError(f"ks={self.ks!r}; every k must be >= 1.")
        return ks


def _listing(ranking: RadialRanking, cfg: RadialConfig, idx: list[int]) -> list[dict[str, Any]]:
    s = tendency_scores(ranking.rows, ranking.meta["n_affirm"], cfg.norm, cfg.combine)
    other = ranking.scores("none" if cfg.norm == "token" else "token", cfg.combine)
    order = {i: r for r, i in enumerate(ranking.order(cfg.norm, cfg.combine), 1)}
    return [{"rank": order[i], "instruction": ranking.instructions[i], "score": float(s["score"][i]),
             "T_a": float(s["log_ta"][i].exp()), "T_r": float(s["log_tr"][i].exp()),
             f"score_norm_{'none' if cfg.norm == 'token' else 'token'}": float(other[i])} for i in idx]


def _instructions_doc(ranking: RadialRanking, cfg: RadialRunConfig) -> dict[str, Any]:
    order = ranking.order(cfg.norm, cfg.combine)
    scores = ranking.scores(cfg.norm, cfg.combine)
    q = max(1, round(cfg.quantile * len(order)))
    return {
        "formula": ranking.meta["formula"], "norm": cfg.norm, "combine": cfg.combine, "pstar": cfg.pstar,
        "chosen": {str(k): _listing(ranking, cfg, order[:k]) for k in cfg.k_list()},
        "top": _listing(ranking, cfg, order[: cfg.show]),
        "bottom": _listing(ranking, cfg, order[-cfg.show:][::-1]),
        "sets": {f"top-n (score >= {TOP_CUTOFF})": int((scores >= TOP_CUTOFF).sum()),
                 f"bottom-n (score <= {BOTTOM_CUTOFF})": int((scores <= BOTTOM_CUTOFF).sum()),
                 "top-q / bottom-q": q, "pool": len(order)},
        "distribution": ranking.meta["distribution"], "pool": ranking.meta["pool"],
    }


def run_radial(cfg: RadialRunConfig) -> Path:
    """Score the pool, rank it, build attack prompts for the harmful requests; write OUT/."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:  # fail before the slow part
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    targets = [r.prompt for r in resolve_dataset(cfg.targets).load(cfg.limit, cfg.seed)]
    data_dir = None if cfg.pool else shared_data_dir()
    pool = load_pool(cfg.pool, cfg.pool_size, cfg.seed, cfg.filter, data_dir, read_prompts)
    loaded = load_model(cfg.model, device=cfg.device, chat_template=cfg.chat_template)
    t0 = time.perf_counter()
    ranking = rank_instructions(loaded, pool, cfg, cfg.system)
    t_rank = time.perf_counter() - t0
    rows = []
    for k in cfg.k_list():
        prompts = build_prompts(ranking, _with_k(cfg, k), targets)
        rows += [{"request": r, "k": k, "position": cfg.position, "selection": cfg.selection, "item": p.item,
                  "user": p.messages[0]["content"], "follow_up": p.follow_up, "benign": p.meta["benign"]}
                 for r, p in zip(targets, prompts)]
    t_build = time.perf_counter() - t0 - t_rank
    with staged_dir(out, overwrite=cfg.overwrite) as tmp:
        ranking.save(tmp / "ranking", loaded)
        write_json(tmp / "instructions.json", _instructions_doc(ranking, cfg))
        scores = _listing(ranking, cfg, ranking.order(cfg.norm, cfg.combine))
        (tmp / "scores.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in scores))
        (tmp / "prompts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_json(tmp / "radial.json", {
            "kind": "radial_attack", "config": asdict(cfg), "model": loaded.info.as_meta(),
            "timings_s": {"rank": round(t_rank, 2), "assemble": round(t_build, 4)},
            "n_targets": len(targets), "versions": {"latentguard": __version__, "python": platform.python_version()},
            "commit": git_commit(), "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        })
    return out


def _with_k(cfg: RadialRunConfig, k: int) -> RadialConfig:
    """The attack config for one k, with the follow-up turn (the CLI always writes it)."""
    base = {f.name: getattr(cfg, f.name) for f in fields(RadialConfig)}
    return RadialConfig(**{**base, "k": k, "follow_up": True})


@click.group("attack")
def command() -> None:
    """Build jailbreak attacks (`latentguard list attacks`; run them with `latentguard eval --attack`)."""


@command.command("radial")
@config_options(RadialRunConfig)
def radial(config_file: str | None, **flags: Any) -> int:
    """RADIAL: rank benign instructions by affirmation tendency, write the top ones and the attack prompts."""
    cfg = build_config(RadialRunConfig, config_file, flags)
    out = run_radial(cfg)
    click.echo(f"wrote {out}/instructions.json, {out}/prompts.jsonl, {out}/scores.jsonl, {out}/ranking/")
    click.echo(f"use it: latentguard eval --model {cfg.model} --attack radial:{out} ...")
    return 0
