"""`latentguard sae train|eval`: sparse autoencoders on the residual stream (docs/fpo.md).

`train` collects response-token activations of (prompt, response) pairs at resid_post.LAYER
(streamed to float16 shards, resumable), fits a top-k or ReLU SAE and writes an `sae` artefact
(tensors.safetensors + meta.json with the site, input scale and held-out FVU / L0 / dead latents /
spliced cross-entropy). `eval` measures any loadable SAE (artefact, SAELens folder, npz) the same
way on a model, which checks that a public SAE is used at the site and scale it was trained on.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import click

from latentguard.artifacts import write_json
from latentguard.cli.options import build_config, config_options
from latentguard.directions.sae import load_sae
from latentguard.directions.sae_train import (
    SAETrainConfig,
    build_sae,
    evaluate_sae,
    splice_ce,
    write_shards,
)
from latentguard.errors import DataError, OutputExistsError
from latentguard.eval.datasets import shared_data_dir
from latentguard.models import load_model
from latentguard.training.pairs import DEFAULT_SAE_DATA, sae_texts

__all__ = ["command"]


def _texts(data: tuple[str, ...], pairs: tuple[str, ...], seed: int) -> list[tuple[str, str]]:
    try:
        folder: Path | None = shared_data_dir()
    except DataError:
        folder = None  # named sets then raise, naming LATENTGUARD_SHARED_DATA
    return sae_texts(data, pairs, seed, folder)

@click.group("sae")
def command() -> None:
    """Sparse autoencoders: train one on a model's residual stream, or evaluate a loaded one."""


@command.command("train")
@config_options(SAETrainConfig)
@click.option("--model", default="embedded", show_default=True, help="model spec: embedded, a directory, a .gguf or a hub id")
@click.option("--out", required=True, help="output directory (the sae artefact)")
@click.option("--data", multiple=True, help=f"NAME_OR_FILE[:count] of prompt/response pairs (default: {' '.join(DEFAULT_SAE_DATA)})")
@click.option("--pairs", multiple=True, help="preference pairs file(s): chosen and rejected responses both used")
@click.option("--overwrite/--no-overwrite", default=False, help="replace an existing SAE in --out")
def train(config_file: str | None, model: str, out: str, data: tuple[str, ...], pairs: tuple[str, ...],
          overwrite: bool, **flags: Any) -> int:
    """Train a top-k (or ReLU) SAE on resid_post.LAYER; resumable (activation shards are kept until done)."""
    cfg = build_config(SAETrainConfig, config_file, flags)
    texts = _texts(data, pairs, cfg.seed)
    path = build_sae(load_model(model), texts, cfg, out, overwrite, log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {path}/tensors.safetensors and {path}/meta.json")
    return 0


@command.command("eval")
@click.option("--model", default="embedded", show_default=True, help="model spec the SAE reads")
@click.option("--sae", "sae_path", required=True, help="SAE: artefact, SAELens folder, .npz or .safetensors")
@click.option("--site", default=None, help="site of a bare weights file, e.g. resid_post.25")
@click.option("--data", multiple=True, help="NAME_OR_FILE[:count] of prompt/response pairs (default: the train mix)")
@click.option("--pairs", multiple=True, help="preference pairs file(s)")
@click.option("--max-tokens", default=20_000, show_default=True, help="response tokens to evaluate on")
@click.option("--seed", default=1, show_default=True, help="seed of the text sample")
@click.option("--out", required=True, help="output directory: eval.json")
def evaluate(model: str, sae_path: str, site: str | None, data: tuple[str, ...], pairs: tuple[str, ...],
             max_tokens: int, seed: int, out: str) -> int:
    """FVU, L0, dead latents and spliced cross-entropy of an SAE on this model."""
    folder = Path(out)
    if (folder / "eval.json").exists():
        raise OutputExistsError(f"{folder}/eval.json exists; choose another --out.")
    loaded = load_model(model)
    sae = load_sae(sae_path, model=loaded.info, site=site)
    texts = _texts(data, pairs, seed)
    random.Random(seed).shuffle(texts)
    shards = write_shards(loaded, texts, str(sae.site), folder / "activations", max_tokens, max_tokens)
    stats: dict[str, Any] = {"sae": sae_path, "site": str(sae.site), "architecture": sae.meta.architecture, "d_sae": sae.d_sae,
             **evaluate_sae(sae, shards), "splice": splice_ce(loaded, sae, texts[:32])}
    write_json(folder / "eval.json", stats)
    shutil.rmtree(folder / "activations")
    click.echo(f"FVU {stats['fvu']:.3f}, L0 {stats['l0']:.1f}, dead {stats['dead_fraction']:.1%}, "
               f"CE +{stats['splice']['ce_increase']:.3f} nats; wrote {folder}/eval.json")
    return 0
