"""Run logs: `log.jsonl` (one line per logging step) and a small loss plot (PNG + HTML)."""

from __future__ import annotations

import base64
import html as _html
import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["JsonlLogger", "read_log", "write_plot"]

LOG_FILE = "log.jsonl"
_SKIP = ("num_tokens", "epoch", "grad_norm", "mean_token_accuracy", "entropy")


class JsonlLogger(TrainerCallback):
    """Appends `{step, epoch, loss, <method terms>, learning_rate, ...}` per log event (rank 0 only).

    On resume, lines past the checkpoint's step are dropped first, so the file has no duplicates.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero and self.path.is_file():
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= state.global_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, **{k: _num(v) for k, v in logs.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _num(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_plot(log_path: str | Path, title: str) -> list[Path]:
    """`loss.png` and a self-contained `loss.html` beside the log: loss and method terms per step.

    Per-layer families logged as `name/LAYER` are left out; plot them from `log.jsonl`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_log(log_path) if "loss" in r]
    keys = ["loss"] + sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))
                              and k not in ("step", "loss", "learning_rate", *_SKIP) and not k.startswith("train_")
                              and "/" not in k})  # `name/layer` families (per-layer drift) would swamp the plot
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(log_path).with_name("loss.png")
    fig.savefig(png)
    plt.close(fig)
    page = png.with_suffix(".html")
    data = base64.b64encode(png.read_bytes()).decode()
    esc = _html.escape(title)
    page.write_text(f"<!doctype html><meta charset='utf-8'><title>{esc}</title>"
                    f"<h3>{esc}</h3><img alt='loss curve' src='data:image/png;base64,{data}'>\n")
    return [png, page]
