"""`latentguard merge RUN --out MERGED`: a LoRA run's adapter merged into its base model."""

from __future__ import annotations

import click

from latentguard.training.merge import merge_run

__all__ = ["command"]


@click.command("merge")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="merged model directory")
@click.option("--overwrite/--no-overwrite", default=False, help="replace an existing --out")
def command(run_dir: str, out: str, overwrite: bool) -> int:
    """Merge RUN_DIR/adapter into the base model recorded in RUN_DIR/meta.json; save a plain HF checkpoint."""
    path = merge_run(run_dir, out, overwrite=overwrite)
    click.echo(f"wrote {path} (load with --model {path})")
    return 0
