"""HTML report for one or more `latentguard eval` runs, rendered from their files alone
(run.json, summary.json, generations.jsonl, judgements.jsonl): tables with 95% CIs, a
safety-vs-usability Pareto plot when runs are compared, examples and judge disagreements, and
for attack × defence runs a heat map of the harmful rate beside each defence's over-refusal."""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentguard import __version__
from latentguard.artifacts import git_commit
from latentguard.errors import DataError
from latentguard.eval.html import fig_to_svg, new_figure, new_figure_row, render

__all__ = ["RunView", "load_run", "matrix_view", "render_eval_report", "write_eval_report"]


@dataclass
class RunView:
    """What the report needs from one run directory."""

    path: Path
    label: str
    summary: dict[str, Any]
    responses: dict[tuple[str, str], str]  # (dataset, id) -> response


def _label(summary: dict[str, Any]) -> str:
    run = summary["run"]
    if "matrix" in summary:
        m = summary["matrix"]
        return f"{run['model']['model_id']} · {len(m['attacks'])} attacks × {len(m['defenses'])} defences"
    defs = [d.get("defense", "?") + ("" if d.get("alpha") is None else f"(α={d['alpha']})") for d in run.get("defenses", [])]
    return run["model"]["model_id"] + (" + " + " + ".join(defs) if defs else "")


def load_run(path: str | Path) -> RunView:
    """Read a run directory; a missing or unreadable summary is a one-line error."""
    path = Path(path)
    f = path / "summary.json"
    if not f.is_file():
        raise DataError(f"{path} has no summary.json; pass a directory written by `latentguard eval`.")
    try:
        summary = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f} is not valid JSON ({e.msg}); rerun `latentguard eval` into {path}.") from e
    responses: dict[tuple[str, str], str] = {}
    gens = path / "generations.jsonl"
    if gens.is_file():
        for line in gens.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a cut-off last line; eval repairs it on the next run
            responses[(r.get("dataset", ""), str(r.get("id")))] = r.get("response", "")
    _flatten_judges(summary)
    return RunView(path, _label(summary), summary, responses)


def _flatten_judges(summary: dict[str, Any]) -> None:
    """Lift each judge's `refusal` block (refusal_rate, asr, overrefusal_rate) to the judge level."""
    for entry in summary.get("datasets", {}).values():
        blocks = [entry, *entry.get("categories", {}).values()]
        for b in blocks:
            for j in b.get("judges", {}).values():
                j.update(j.pop("refusal", {}))


def _pick_rate(entry: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The keyword judge's rate if present, else the first judge reporting it."""
    judges = entry.get("judges", {})
    for name in ["keyword", *judges]:
        block = judges.get(name, {})
        if key in block:
            return {**block[key], "judge": name}
    return None


def _headline(run: RunView) -> dict[str, Any]:
    """Harmful rate (mean over harmful sets), over-refusal and GSM8K NLL of one run."""
    asr, over, nll = [], [], []
    for entry in run.summary["datasets"].values():
        if entry["role"] == "harmful" and (r := _pick_rate(entry, "asr")):
            asr.append(r["value"])
        elif entry["role"] == "overrefusal" and (r := _pick_rate(entry, "overrefusal_rate")):
            over.append(r["value"])
        elif entry["role"] == "utility" and "utility" in entry:
            nll.append(entry["utility"]["nll_per_token"]["value"])

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {"label": run.label, "harmful": mean(asr), "overrefusal": mean(over), "nll": mean(nll)}


def _pareto(heads: list[dict[str, Any]]) -> str | None:
    pts = [h for h in heads if h["harmful"] is not None and h["overrefusal"] is not None]
    if len(pts) < 2:
        return None
    fig, ax = new_figure(6.5, 4.2)
    nlls = [h["nll"] for h in pts if h["nll"] is not None]
    for h in pts:
        # lower NLL = more useful = bigger marker
        size = 80 if h["nll"] is None or not nlls else 40 + 260 * (max(nlls) - h["nll"] + 1e-9) / (max(nlls) - min(nlls) + 1e-9)
        ax.scatter(100 * h["overrefusal"], 100 * h["harmful"], s=size, alpha=0.7)
        ax.annotate(h["label"], (100 * h["overrefusal"], 100 * h["harmful"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="over-refusal on benign prompts (%)", ylabel="harmful rate (%)", xlim=(-3, 103), ylim=(-3, 103))
    ax.set_title("safety vs usability (lower-left is better; marker size = utility)", fontsize=9)
    return fig_to_svg(fig)


def _disagreements(run: RunView) -> list[dict[str, Any]]:
    """Up to 5 example responses per disagreement cell of every judge pair."""
    out = []
    for ds, entry in run.summary["datasets"].items():
        for pair, ag in entry.get("agreement", {}).items():
            for cell, ids in (ag.get("examples") or {}).items():
                for i in ids[:5]:
                    out.append({"dataset": ds, "pair": pair, "cell": cell, "id": i,
                                "response": run.responses.get((ds, str(i)), "")[:400]})
    return out


def matrix_view(run: RunView) -> dict[str, Any] | None:
    """Rows = defence columns, columns = attacks: harmful rate per cell, over-refusal per defence."""
    m = run.summary.get("matrix")
    if not m:
        return None
    attacks = [a["label"] for a in m["attacks"]]
    defenses = [d["label"] for d in m["defenses"]]
    cells = [[m["harmful_rate"].get(a, {}).get(d) for a in attacks] for d in defenses]
    over = [m["overrefusal"].get(d) for d in defenses]
    judges = sorted({c["judge"] for row in cells for c in row if c and c.get("judge")})
    return {"attacks": attacks, "defenses": defenses, "cells": cells, "overrefusal": over, "judges": judges,
            "svg": _heatmap(attacks, defenses, cells, over)}


def _value(c: dict[str, Any] | None) -> float:
    return float("nan") if not c or c.get("value") is None else 100 * float(c["value"])


def _annotate(ax: Any, values: list[list[float]]) -> None:
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            known = not math.isnan(v)
            ax.text(j, i, f"{v:.0f}" if known else "—", ha="center", va="center", fontsize=9,
                    color="white" if known and v > 60 else "black")


def _heatmap(attacks: list[str], defenses: list[str], cells: list[list[Any]], over: list[Any]) -> str:
    """Harmful rate (defence × attack, reds) with over-refusal per defence beside it (blues), in %."""
    harm = [[_value(c) for c in row] for row in cells]
    ref = [[_value(o)] for o in over]
    long_a, long_d = max(map(len, attacks), default=4), max(map(len, defenses), default=4)
    fig, (ax, ax2) = new_figure_row(2.6 + 0.8 * len(attacks) + 0.07 * long_d, 1.4 + 0.42 * len(defenses) + 0.06 * long_a,
                                    [max(1, len(attacks)), 1])
    ax.imshow(harm, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(defenses)), defenses, fontsize=8)
    ax.set_xlabel("attack", fontsize=8)
    ax.set_ylabel("defence", fontsize=8)
    ax.set_title("harmful rate (%)", fontsize=9)
    _annotate(ax, harm)
    ax2.imshow(ref, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    ax2.set_xticks([0], ["benign"], fontsize=8)
    ax2.set_yticks(range(len(defenses)), [""] * len(defenses))
    ax2.set_title("over-refusal (%)", fontsize=9)
    _annotate(ax2, ref)
    return fig_to_svg(fig)


def render_eval_report(runs: list[RunView]) -> str:
    heads = [_headline(r) for r in runs]
    return render(
        "eval.html.j2", runs=runs, heads=heads, pareto=_pareto(heads), matrices=[matrix_view(r) for r in runs],
        disagreements=[_disagreements(r) for r in runs],
        version=__version__, commit=git_commit(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        source=", ".join(str(r.path) for r in runs),
    )


def write_eval_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Render the report of `run_dirs` to `out` (a .html file, or a directory getting report.html)."""
    if not run_dirs:
        raise DataError("No run directories given; pass at least one directory written by `latentguard eval`.")
    runs = [load_run(p) for p in run_dirs]
    labels = [r.label for r in runs]
    for r in runs:  # tell apart runs of the same model and defences
        if labels.count(r.label) > 1:
            r.label = f"{r.label} [{r.path.name}]"
    out = Path(out)
    target = out if out.suffix == ".html" else out / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render_eval_report(runs))
    tmp.replace(target)
    return target
