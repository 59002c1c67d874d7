"""The `scan` job end to end: read prompts, load the model, scan, write scan.json, the
direction artefact and a self-contained report.html into an output directory (all or nothing)."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentguard import __version__
from latentguard.artifacts import git_commit, staged_dir, write_json
from latentguard.directions import ScanConfig, scan_model
from latentguard.errors import OutputExistsError
from latentguard.eval.datasets import portable_path, read_records, sample, shared_data_dir
from latentguard.eval.html import fig_to_svg, new_figure, render
from latentguard.models import load_model

__all__ = ["ScanRunConfig", "render_scan_report", "run_scan"]


@dataclass
class ScanRunConfig(ScanConfig):
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    harmful: str | None = field(default=None, metadata={"help": "harmful prompts (CSV/JSON/JSONL); default: refusal-direction harmful_train"})
    harmless: str | None = field(default=None, metadata={"help": "harmless prompts; default: refusal-direction harmless_train"})
    column: str | None = field(default=None, metadata={"help": "prompt column in the data files (default: auto-detect)"})
    out: str = field(default="out/scan", metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (file or string) overriding the tokenizer's"})


def _data_path(given: str | None, default_name: str) -> Path:
    return Path(given) if given else shared_data_dir() / "refusal_direction_splits" / default_name


def run_scan(cfg: ScanRunConfig) -> Path:
    """Run the scan job; returns the output directory."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:  # fail before the slow part
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    paths = {"harmful": _data_path(cfg.harmful, "harmful_train.json"), "harmless": _data_path(cfg.harmless, "harmless_train.json")}
    prompts = {k: [r.prompt for r in sample(read_records(p, cfg.column), cfg.n, cfg.seed)] for k, p in paths.items()}
    loaded = load_model(cfg.model, chat_template=cfg.chat_template)
    result = scan_model(loaded, prompts["harmful"], prompts["harmless"], cfg)
    summary = result.summary
    summary["data"].update(harmful_source=portable_path(paths["harmful"]), harmless_source=portable_path(paths["harmless"]))
    summary["latentguard"] = {"version": __version__, "commit": git_commit()}
    summary["created_utc"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    with staged_dir(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "scan.json", summary)
        result.artifact.meta["data"] = summary["data"]
        result.artifact.save(tmp / "directions", model=loaded.info)
        (tmp / "report.html").write_text(render_scan_report(summary, source="scan.json"))
    return out


def _fig_probe(s: dict[str, Any]) -> str:
    fig, ax = new_figure()
    layers = [r["layer"] for r in s["layers"]]
    ax.plot(layers, [r["probe_test_acc"] for r in s["layers"]], "o-", label="held-out")
    ax.plot(layers, [r["probe_train_acc"] for r in s["layers"]], "--", color="grey", label="train")
    ax.axvline(s["best_layer"], color="tab:red", lw=1, ls=":", label=f"best layer {s['best_layer']}")
    ax.set(xlabel="layer", ylabel="probe accuracy", ylim=(0.4, 1.02))
    ax.legend(loc="lower right")
    return fig_to_svg(fig)


def _fig_direction(s: dict[str, Any]) -> str:
    fig, ax = new_figure()
    layers = [r["layer"] for r in s["layers"]]
    ax.plot(layers, [r["direction_norm"] for r in s["layers"]], "o-", color="tab:blue")
    ax.set(xlabel="layer", ylabel="‖mean diff‖")
    ax2 = ax.twinx()
    cos = [np.nan if r["cos_prev"] is None else r["cos_prev"] for r in s["layers"]]
    ax2.plot(layers, cos, "s--", color="tab:orange")
    ax2.set(ylabel="cos(previous layer)", ylim=(-0.05, 1.05))
    return fig_to_svg(fig)


def _fig_lens(s: dict[str, Any]) -> str:
    fig, ax = new_figure()
    layers = [r["layer"] for r in s["layers"]]
    ax.plot(layers, [r["lens_refusal_harmful"] for r in s["layers"]], "o-", color="tab:red", label="harmful")
    ax.plot(layers, [r["lens_refusal_harmless"] for r in s["layers"]], "o-", color="tab:green", label="harmless")
    ax.set(xlabel="layer", ylabel="refusal proxy (logit lens)")
    ax.legend()
    return fig_to_svg(fig)


def _fig_heads(s: dict[str, Any]) -> str:
    grid = np.array(s["heads"]["probe_test_acc"])
    fig, ax = new_figure(7.0, 0.5 + 0.9 * grid.shape[1] / 3)
    im = ax.imshow(grid.T, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0, origin="lower")
    ax.set(xlabel="layer", ylabel="head")
    fig.colorbar(im, ax=ax, label="probe accuracy")
    return fig_to_svg(fig)


def render_scan_report(summary: dict[str, Any], source: str) -> str:
    """HTML report rendered from a scan.json dict alone."""
    best = summary["layers"][summary["best_layer"]]
    return render(
        "scan.html.j2", s=summary, best=best, fig_probe=_fig_probe(summary), fig_dir=_fig_direction(summary),
        fig_lens=_fig_lens(summary), fig_heads=_fig_heads(summary), version=__version__,
        commit=summary.get("latentguard", {}).get("commit"), created=summary.get("created_utc", ""), source=source,
    )


def load_scan(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "scan.json").read_text())
