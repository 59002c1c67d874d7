"""`latentguard scan`: per-layer and per-head separability of harmful vs harmless prompts."""

from __future__ import annotations

from typing import Any

import click

from latentguard.cli.options import build_config, config_options
from latentguard.eval.scan import ScanRunConfig, run_scan


@click.command("scan")
@config_options(ScanRunConfig)
def command(config_file: str | None, **flags: Any) -> int:
    """Scan a model: probes, diff-in-means directions, refusal proxy, head heatmap, report."""
    cfg = build_config(ScanRunConfig, config_file, flags)
    out = run_scan(cfg)
    click.echo(f"wrote {out}/scan.json, {out}/directions/, {out}/report.html")
    click.echo(f"report: {(out / 'report.html').resolve()}")
    return 0
