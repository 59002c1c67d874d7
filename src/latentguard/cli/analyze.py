"""`latentguard analyze lens|modules|router`: logit lens per layer and position (HTML); module robustness for
ML-LR; MoGU gate values per layer for harmful vs benign prompts (`router`, see eval/router.py).

`analyze modules --model SPEC --out DIR` writes a `module_scores` artefact in DIR (pass it to
`latentguard train --method mllr --mllr-scores DIR`), `modules.json` (per-unit drift, robust set,
probe accuracies) and `modules.png` (robustness as a module-type × depth heat map).
"""

from __future__ import annotations

import datetime as _dt
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click

from latentguard.artifacts import git_commit, staged_dir, write_json
from latentguard.cli._report import render_lens_report
from latentguard.cli.options import build_config, config_options
from latentguard.directions.lens import LensConfig, logit_lens
from latentguard.directions.modules import (
    ModuleData,
    ModuleScoreConfig,
    module_data_from_splits,
    score_modules,
)
from latentguard.errors import ConfigError, OutputExistsError
from latentguard.eval.datasets import shared_data_dir
from latentguard.eval.router import RouterAnalysisConfig, run_router_analysis
from latentguard.models import load_model
from latentguard.training.data import read_prompts

__all__ = ["LensRunConfig", "ModulesRunConfig", "command", "run_lens", "run_modules"]


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
    """Analyses of hidden states: the logit lens; module robustness (ML-LR)."""


@command.command("lens")
@config_options(LensRunConfig)
def lens(config_file: str | None, **flags: Any) -> int:
    """Top-k tokens and refusal-token probability per layer and position (logit lens), as an HTML heat map."""
    cfg = build_config(LensRunConfig, config_file, flags)
    out = run_lens(cfg)
    click.echo(f"wrote {out}/lens.json, {out}/lens.html")
    return 0


@dataclass
class ModulesRunConfig(ModuleScoreConfig):
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    n_fit: int = field(default=128, metadata={"help": "prompts per class to fit the probes (spec: 128)"})
    n_val: int = field(default=32, metadata={"help": "held-out prompts per class, the drift set E (spec: 32)"})
    data_seed: int = field(default=42, metadata={"help": "seed of the prompt samples"})
    harmful: str | None = field(default=None, metadata={"help": "harmful fit prompts (default: refusal_direction_splits/harmful_train.json)"})
    harmless: str | None = field(default=None, metadata={"help": "harmless fit prompts (default: .../harmless_train.json)"})
    harmful_val: str | None = field(default=None, metadata={"help": "harmful held-out prompts (default: .../harmful_val.json)"})
    harmless_val: str | None = field(default=None, metadata={"help": "harmless held-out prompts (default: .../harmless_val.json)"})
    out: str = field(default="out/modules", metadata={"help": "output directory (artefact, modules.json, modules.png)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.n_fit, self.n_val) < 1:
            raise ConfigError(f"n_fit={self.n_fit}, n_val={self.n_val}; use >= 1 each.")
        files = [self.harmful, self.harmless, self.harmful_val, self.harmless_val]
        if any(files) and not all(files):
            raise ConfigError("Pass all four of --harmful --harmless --harmful-val --harmless-val, or none (shared splits).")

    def module_data(self) -> ModuleData:
        if self.harmful is None:
            return module_data_from_splits(shared_data_dir() / "refusal_direction_splits", self.n_fit, self.n_val, self.data_seed)
        sets = [read_prompts(str(p)) for p in (self.harmful, self.harmless, self.harmful_val, self.harmless_val)]
        rng = random.Random(self.data_seed)
        return ModuleData(*[rng.sample(v, min(n, len(v))) for v, n in zip(sets, [self.n_fit] * 2 + [self.n_val] * 2)])

    def score_config(self) -> ModuleScoreConfig:
        return ModuleScoreConfig(**{f.name: getattr(self, f.name) for f in fields(ModuleScoreConfig)})


def _modules_plot(meta: dict[str, Any], path: Path) -> None:
    """Robustness R = −D per unit as a role × layer-group heat map; the robust set is boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    units = meta["units"]
    roles = list(dict.fromkeys(u["role"] for u in units))
    groups = list(dict.fromkeys(tuple(u["layers"]) for u in units))
    grid = np.full((len(roles), len(groups)), np.nan)
    for u in units:
        grid[roles.index(u["role"]), groups.index(tuple(u["layers"]))] = u["robustness"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(groups), 1.4 + 0.45 * len(roles)), dpi=100)
    im = ax.imshow(grid, cmap="RdYlGn", aspect="auto")
    for u in units:
        if u["robust"]:
            i, j = roles.index(u["role"]), groups.index(tuple(u["layers"]))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    ax.set_yticks(range(len(roles)), roles)
    ax.set_xticks(range(len(groups)), [f"{g[0]}-{g[-1]}" for g in groups], rotation=60, fontsize=7)
    ax.set_xlabel("layers")
    ax.set_title(f"robustness R = -D ({meta['scorer']}); boxed: robust set, tau={meta['tau']}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_modules(cfg: ModulesRunConfig) -> Path:
    """Score the model's units and write the artefact, modules.json and modules.png into `cfg.out`."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    data = cfg.module_data()
    loaded = load_model(cfg.model)
    art = score_modules(loaded, data, cfg.score_config(), progress=lambda m: click.echo(f"[modules] {m}", err=True))
    with staged_dir(out, overwrite=cfg.overwrite) as tmp:
        art.save(tmp, model=loaded.info)
        summary = {k: v for k, v in art.meta.items() if k not in ("tensors",)}
        write_json(tmp / "modules.json", summary)
        _modules_plot(art.meta, tmp / "modules.png")
    return out


@command.command("modules")
@config_options(ModulesRunConfig)
def modules(config_file: str | None, **flags: Any) -> int:
    """Module robustness for ML-LR: probe drift per (module type, layer group) and the robust set."""
    cfg = build_config(ModulesRunConfig, config_file, flags)
    out = run_modules(cfg)
    click.echo(f"wrote {out}/modules.json, {out}/modules.png, artefact {out} (train --method mllr --mllr-scores {out})")
    return 0


@command.command("router")
@config_options(RouterAnalysisConfig)
def router(config_file: str | None, **flags: Any) -> int:
    """MoGU gates (w_u, w_g) per routed layer on harmful vs benign prompts: router.json and router.png."""
    cfg = build_config(RouterAnalysisConfig, config_file, flags)
    out = run_router_analysis(cfg)
    click.echo(f"wrote {out}/router.json, {out}/router.png")
    return 0
