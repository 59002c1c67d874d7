"""`latentguard analyze router`: MoGU gate values per routed layer on harmful vs benign prompts.

Writes `router.json` (per layer and class: mean and 10/50/90 % quantiles of w_u and w_g at the last
prompt token and averaged over the prompt; AUROC of w_u − w_g for harmful vs benign, per layer and
for the layer mean) and `router.png` (the paper's router-weight figure, as per-layer bands).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from latentguard.artifacts import git_commit, staged_dir, write_json
from latentguard.defenses.mogu import load_mogu, router_gates
from latentguard.errors import ConfigError, OutputExistsError
from latentguard.eval.datasets import portable_path, read_records, sample, shared_data_dir
from latentguard.eval.html import new_figure
from latentguard.models import load_model

__all__ = ["RouterAnalysisConfig", "run_router_analysis"]


@dataclass
class RouterAnalysisConfig:
    model: str = field(default="embedded", metadata={"help": "'embedded', a model directory, a .gguf file or a hub id"})
    mogu: str = field(default="", metadata={"help": "MoGU artefact (or the --out of `train --method mogu|mogu2`)"})
    harmful: str | None = field(default=None, metadata={"help": "harmful prompts (default: refusal_direction_splits/harmful_test.json)"})
    harmless: str | None = field(default=None, metadata={"help": "benign prompts (default: refusal_direction_splits/harmless_test.json)"})
    n: int = field(default=32, metadata={"help": "prompts per side (seeded sample)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass"})
    out: str = field(default="out/router", metadata={"help": "output directory (router.json, router.png)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self) -> None:
        if not self.mogu:
            raise ConfigError("No MoGU artefact; pass --mogu DIR (the --out of `latentguard train --method mogu`).")
        if self.n < 2 or self.batch_size < 1:
            raise ConfigError(f"n={self.n}, batch_size={self.batch_size}; use n >= 2 and batch_size >= 1.")


def _stats(x: np.ndarray) -> dict[str, float]:
    q10, q50, q90 = np.quantile(x, [0.1, 0.5, 0.9])
    return {"mean": float(x.mean()), "q10": float(q10), "median": float(q50), "q90": float(q90)}


def _auroc(score: np.ndarray, y: np.ndarray) -> float | None:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None


def _summary(gates: dict[str, torch.Tensor], layers: list[int], n_harm: int) -> dict[str, Any]:
    y = np.array([1] * n_harm + [0] * (len(gates["last"]) - n_harm))
    out: dict[str, Any] = {}
    for where, g in gates.items():
        a = g.numpy()  # [n, L, 2]
        diff = a[..., 0] - a[..., 1]
        out[where] = {
            "layers": [{"layer": l, **{f"{cls}_{name}": _stats(a[mask, i, j])
                                       for cls, mask in (("harmful", y == 1), ("benign", y == 0))
                                       for j, name in ((0, "w_u"), (1, "w_g"))},
                        "auroc_wu_minus_wg": _auroc(diff[:, i], y)} for i, l in enumerate(layers)],
            "layer_mean_auroc": _auroc(diff.mean(1), y),
            "mean_w_u": {"harmful": float(a[y == 1, :, 0].mean()), "benign": float(a[y == 0, :, 0].mean())},
            "mean_w_sum": float(a.sum(-1).mean()),
        }
    return out


def _plot(summary: dict[str, Any], path: Path, title: str) -> None:
    rows = summary["last"]["layers"]
    layers = [r["layer"] for r in rows]
    fig, _axes = new_figure(8.0, 3.2)
    fig.clf()
    for k, gate in enumerate(("w_u", "w_g")):
        ax = fig.add_subplot(1, 2, k + 1)
        for cls, colour in (("harmful", "tab:red"), ("benign", "tab:blue")):
            mean = [r[f"{cls}_{gate}"]["mean"] for r in rows]
            lo, hi = [r[f"{cls}_{gate}"]["q10"] for r in rows], [r[f"{cls}_{gate}"]["q90"] for r in rows]
            ax.plot(layers, mean, marker="o", ms=3, color=colour, label=cls)
            ax.fill_between(layers, lo, hi, color=colour, alpha=0.2)
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_title(f"{gate} ({'Unwill' if gate == 'w_u' else 'Glad'}) at the last prompt token", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)


def run_router_analysis(cfg: RouterAnalysisConfig) -> Path:
    """Gate statistics and the per-layer plot for one MoGU artefact; returns the output directory."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    split = shared_data_dir() / "refusal_direction_splits"
    paths = {"harmful": Path(cfg.harmful or split / "harmful_test.json"),
             "harmless": Path(cfg.harmless or split / "harmless_test.json")}
    prompts = {k: [r.prompt for r in sample(read_records(p), cfg.n, cfg.seed)] for k, p in paths.items()}
    loaded = load_model(cfg.model)
    modules, art = load_mogu(cfg.mogu, loaded.info)
    gates = router_gates(loaded, modules, prompts["harmful"] + prompts["harmless"], cfg.batch_size)
    summary = _summary(gates, modules.layout["layers"], len(prompts["harmful"]))
    doc = {"kind": "mogu_router_analysis", "model": loaded.info.as_meta(), "mogu": cfg.mogu,
           "method": art.meta.get("method"), "gate": modules.layout["gate"], "layers": modules.layout["layers"],
           "data": {k: {"source": portable_path(p), "n": len(prompts[k])} for k, p in paths.items()}, **summary,
           "latentguard_commit": git_commit(), "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    with staged_dir(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "router.json", doc)
        _plot(summary, tmp / "router.png", f"{art.meta.get('method')} gates, {len(prompts['harmful'])} harmful vs "
                                            f"{len(prompts['harmless'])} benign prompts (line: mean; band: 10-90 %)")
    return out
