"""`latentguard export`: a standard Hugging Face checkpoint with `ablate` or `add` baked into the weights.

The export is reloaded with plain `AutoModelForCausalLM.from_pretrained` and its logits checked
against the hooked model before the directory is committed (docs/directions.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from latentguard.cli.options import build_config, config_options
from latentguard.defenses import build_defenses
from latentguard.defenses.bake import VERIFY_PROMPTS, export_model
from latentguard.defenses.gguf_export import write_gguf
from latentguard.errors import ConfigError, OutputExistsError
from latentguard.eval.datasets import read_prompts
from latentguard.models import EMBEDDED, embedded_gguf, load_model

__all__ = ["ExportConfig", "command"]


@dataclass
class ExportConfig:
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    defense: list[str] = field(default_factory=list, metadata={"cli": False, "help": "the one defence to bake: ablate:DIR or add:DIR[,alpha=..]"})
    out: str = field(default="out/export", metadata={"help": "output directory (a Hugging Face model directory)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})
    verify_prompts: str | None = field(default=None, metadata={"help": "prompts file for the logit check (default: 8 built-in prompts)"})
    tolerance: float = field(default=1e-4, metadata={"help": "max |logit| difference allowed between exported and hooked model"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (file or string) overriding the tokenizer's"})
    gguf: bool = field(default=False, metadata={"help": "also write OUT/model-f32.gguf for llama.cpp (llama architecture)"})
    gguf_template: str | None = field(default=None, metadata={"help": "GGUF of the base model to copy tokenizer metadata from (default: the --model .gguf / embedded one)"})

    def __post_init__(self) -> None:
        if not self.defense:
            raise ConfigError("No defence to bake; pass --defense ablate:DIR or --defense add:DIR.")
        if not self.tolerance > 0:
            raise ConfigError(f"tolerance={self.tolerance}; use a value > 0 (default 1e-4).")


def _gguf_template(cfg: ExportConfig) -> Path | None:
    """The base model's GGUF (tokenizer metadata source), checked before the slow part."""
    if not cfg.gguf:
        return None
    if cfg.gguf_template:
        return Path(cfg.gguf_template)
    if cfg.model == EMBEDDED:
        return embedded_gguf()
    if cfg.model.endswith(".gguf"):
        return Path(cfg.model)
    raise ConfigError(
        "--gguf copies the tokenizer metadata from a GGUF of the base model; pass --gguf-template BASE.gguf, or run "
        "llama.cpp's convert_hf_to_gguf.py on the exported directory."
    )


@click.command("export")
@config_options(ExportConfig)
@click.option("--defense", "defense", multiple=True, help="defence spec to bake: ablate:DIR or add:DIR[,alpha=A,layer=L]")
def command(config_file: str | None, defense: tuple[str, ...], **flags: Any) -> int:
    """Bake `ablate` (weight orthogonalisation) or `add` (a bias) into a reloadable checkpoint."""
    flags["defense"] = list(defense) or None
    cfg = build_config(ExportConfig, config_file, flags)
    if not cfg.overwrite and Path(cfg.out).exists():
        raise OutputExistsError(f"Output {cfg.out} already exists; pass --overwrite or choose another --out.")
    template = _gguf_template(cfg)
    prompts = read_prompts(cfg.verify_prompts) if cfg.verify_prompts else list(VERIFY_PROMPTS)
    loaded = load_model(cfg.model, chat_template=cfg.chat_template)
    out = export_model(loaded, build_defenses(cfg.defense, loaded), cfg.out, prompts, cfg.tolerance, cfg.overwrite)
    click.echo(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained; check in {out}/latentguard_export.json)")
    if template is not None:
        click.echo(f"wrote {write_gguf(out, template)} (llama.cpp: llama-cli -m that file)")
    return 0
