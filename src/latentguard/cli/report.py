"""`latentguard report RUN_DIR... --out PATH`: one HTML report comparing eval runs."""

from __future__ import annotations

import click

from latentguard.eval.report import write_eval_report


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="report file (.html) or directory (gets report.html)")
def command(run_dirs: tuple[str, ...], out: str) -> int:
    """Render an HTML report (tables, Pareto plot, examples, judge disagreements) from eval runs."""
    path = write_eval_report(list(run_dirs), out)
    click.echo(f"report: {path.resolve()}")
    return 0
