"""`latentguard generate`: quick looks at a model's responses, with or without defences.

Reuses the eval generation path (`eval.generation.generate`): chat template, left-padded batches,
defences around each batch. With `--out DIR` the records are kept (and resumed) in
DIR/generations.jsonl; without it they go to a temporary directory.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from latentguard.cli.options import build_config, config_options
from latentguard.defenses import build_defenses
from latentguard.errors import ConfigError
from latentguard.eval.datasets import Record, read_records
from latentguard.eval.generation import GenerationConfig, generate, open_generations
from latentguard.models import load_model

__all__ = ["GenerateConfig", "command", "run_generate"]


@dataclass
class GenerateConfig(GenerationConfig):
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    prompt: list[str] = field(default_factory=list, metadata={"cli": False, "help": "user prompts (repeatable --prompt)"})
    prompts_file: str | None = field(default=None, metadata={"help": "CSV/JSON/JSONL file of prompts, added after --prompt"})
    defense: list[str] = field(default_factory=list, metadata={"cli": False, "help": "defence specs NAME[:ARTEFACT][,k=v] (repeatable)"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (file or string) overriding the tokenizer's"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto"})
    out: str | None = field(default=None, metadata={"help": "keep generations.jsonl here (default: a temporary directory)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompt and not self.prompts_file:
            raise ConfigError("No prompts; pass --prompt TEXT (repeatable) or --prompts-file FILE.")


def run_generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Generate one response per prompt; returns the generation records in prompt order."""
    records = [Record(prompt=p, id=str(i), source="cli") for i, p in enumerate(cfg.prompt)]
    if cfg.prompts_file:
        records += read_records(cfg.prompts_file)
    loaded = load_model(cfg.model, device=cfg.device, chat_template=cfg.chat_template)
    defenses = build_defenses(cfg.defense, loaded)
    with tempfile.TemporaryDirectory(prefix="latentguard-generate-") as tmp:
        out = Path(cfg.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        store = open_generations(out, loaded)
        keys = generate(loaded, records, cfg, store, defenses, progress=False)
        return [store.records[k] for k in keys]


@click.command("generate")
@config_options(GenerateConfig)
@click.option("--prompt", "prompt", multiple=True, help="user prompt; repeat for several")
@click.option("--defense", "defense", multiple=True, help="defence spec NAME[:ARTEFACT][,k=v]; repeat to compose")
def command(config_file: str | None, prompt: tuple[str, ...], defense: tuple[str, ...], **flags: Any) -> int:
    """Generate responses to prompts, optionally under defences (e.g. --defense ablate:DIR)."""
    flags.update(prompt=list(prompt) or None, defense=list(defense) or None)
    cfg = build_config(GenerateConfig, config_file, flags)
    for rec in run_generate(cfg):
        click.echo(f"### {rec['prompt']}\n{rec['response']}\n")
    if cfg.out:
        click.echo(f"wrote {cfg.out}/generations.jsonl")
    return 0
