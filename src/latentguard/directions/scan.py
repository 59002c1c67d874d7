"""`scan`: where a model separates harmful from harmless prompts, layer by layer and head by head.

From one tapped pass per prompt set (block inputs at the post-instruction positions and
per-head o_proj inputs at the last prompt token) it computes, per layer: held-out probe
accuracy, the diff-in-means direction, its norm, the cosine to the previous layer's
direction, the held-out separation along it, and the refusal proxy read through the
logit lens; per head: held-out probe accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentguard.artifacts import Artifact, sha256_of_texts
from latentguard.directions.metrics import refusal_metric, refusal_token_ids
from latentguard.directions.probes import fit_probe, split_indices
from latentguard.errors import ConfigError, DataError
from latentguard.hooks import collect
from latentguard.models import LoadedModel, arch_of, eoi_token_ids, format_prompts

__all__ = ["SCAN_SCHEMA", "ScanConfig", "ScanResult", "scan_model"]

SCAN_SCHEMA = 1


@dataclass
class ScanConfig:
    """Settings of one scan (the CLI adds model, data and output options)."""

    n: int = field(default=64, metadata={"help": "prompts per side (seeded sample of each file)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass"})
    test_fraction: float = field(default=0.3, metadata={"help": "held-out share of each class for probe accuracy"})
    seed: int = field(default=42, metadata={"help": "seed of the prompt sample and the probe split"})
    refusal_tokens: str = field(default="I", metadata={"help": "comma-separated words whose first token is a refusal token (spec §3)"})
    layer_cutoff: float = field(default=0.8, metadata={"help": "best layer is chosen among layers < cutoff × n_layers (spec §5)"})

    def __post_init__(self) -> None:
        if self.n < 4:
            raise ConfigError(f"n={self.n}; use at least 4 prompts per side so the probe has a test split.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}; use >= 1.")
        if not 0.05 <= self.test_fraction <= 0.8:
            raise ConfigError(f"test_fraction={self.test_fraction}; use a value in [0.05, 0.8].")
        if not 0 < self.layer_cutoff <= 1:
            raise ConfigError(f"layer_cutoff={self.layer_cutoff}; use a value in (0, 1].")

    def refusal_words(self) -> list[str]:
        return [w.strip() for w in self.refusal_tokens.split(",") if w.strip()]


@dataclass
class ScanResult:
    summary: dict[str, Any]  # everything in scan.json
    artifact: Artifact  # kind "scan_directions"


def _lens_metric(loaded: LoadedModel, resid: Tensor, ids: list[int]) -> Tensor:
    """Refusal proxy of residual vectors read through the final norm and unembedding."""
    model = loaded.model
    arch = arch_of(model)
    p = next(model.parameters())
    with torch.no_grad():
        h = arch.get(model, arch.final_norm)(resid.to(p.device, p.dtype))
        logits = model.get_output_embeddings()(h)
    return refusal_metric(logits.cpu(), ids)


def _capture(loaded: LoadedModel, texts: list[str], n_eoi: int, cfg: ScanConfig, label: str) -> dict[str, Tensor]:
    L = loaded.info.n_layers
    sites = [f"resid_pre.{l}" for l in range(L)] + [f"resid_post.{L - 1}"] + [f"head_out.{l}" for l in range(L)]
    return collect(
        loaded.model, loaded.tokenizer, texts, sites,
        positions=list(range(-n_eoi, 0)), batch_size=cfg.batch_size, progress=f"scan {label}",
    )


def _layer_rows(acts: dict[str, Tensor], y: np.ndarray, split: tuple[np.ndarray, np.ndarray], cfg: ScanConfig, L: int) -> tuple[list[dict[str, Any]], Tensor, Tensor]:
    train, test = split
    rows: list[dict[str, Any]] = []
    dirs, dirs_eoi = [], []
    prev = None
    for l in range(L):
        x = acts[f"resid_pre.{l}"].double()  # [n, P, d]
        d_eoi = x[y == 1].mean(0) - x[y == 0].mean(0)  # [P, d], float64 (spec §4)
        r = d_eoi[-1]
        dirs.append(r)
        dirs_eoi.append(d_eoi)
        last = x[:, -1].numpy()
        probe = fit_probe(last, y, train, test, cfg.seed)
        rows.append({
            "layer": l,
            "probe_train_acc": probe.train_acc,
            "probe_test_acc": probe.test_acc,
            "direction_norm": float(r.norm()),
            "cos_prev": None if prev is None else _cos(r, prev),
            "separation": _separation(x[:, -1], y, train, test),
        })
        prev = r
    return rows, torch.stack(dirs), torch.stack(dirs_eoi, dim=1)


def _cos(a: Tensor, b: Tensor) -> float | None:
    den = float(a.norm() * b.norm())
    return None if den == 0 else float(a @ b) / den


def _separation(x: Tensor, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out Cohen's d of projections on the train-split direction (0 when it is undefined)."""
    yt = torch.as_tensor(y)
    tr, te = torch.as_tensor(train), torch.as_tensor(test)
    r = x[tr][yt[tr] == 1].mean(0) - x[tr][yt[tr] == 0].mean(0)
    if r.norm() == 0:
        return 0.0
    proj = x[te] @ (r / r.norm())
    a, b = proj[yt[te] == 1], proj[yt[te] == 0]
    pooled = math.sqrt((float(a.var()) + float(b.var())) / 2) if len(a) > 1 and len(b) > 1 else 0.0
    return 0.0 if pooled == 0 else float((a.mean() - b.mean()) / pooled)


def _head_grid(acts: dict[str, Tensor], y: np.ndarray, split: tuple[np.ndarray, np.ndarray], cfg: ScanConfig, L: int) -> list[list[float]]:
    grid = []
    for l in range(L):
        h = acts[f"head_out.{l}"][:, -1]  # [n, H, hd] at the last prompt token
        grid.append([fit_probe(h[:, k].double().numpy(), y, *split, seed=cfg.seed).test_acc for k in range(h.shape[1])])
    return grid


def _best_layer(rows: list[dict[str, Any]], cutoff: float) -> int:
    limit = max(1, int(cutoff * len(rows)))
    return max(rows[:limit], key=lambda r: (r["probe_test_acc"], r["separation"]))["layer"]


def scan_model(loaded: LoadedModel, harmful: list[str], harmless: list[str], cfg: ScanConfig) -> ScanResult:
    """Scan `loaded` on raw (unformatted) harmful and harmless prompts; see module docstring."""
    if not harmful or not harmless:
        raise DataError("Both prompt sets need at least one prompt; check --harmful/--harmless and --n.")
    t0 = time.perf_counter()
    tok, L = loaded.tokenizer, loaded.info.n_layers
    n_eoi = len(eoi_token_ids(tok))
    ids = refusal_token_ids(tok, cfg.refusal_words())
    acts_h = _capture(loaded, format_prompts(tok, harmful), n_eoi, cfg, "harmful")
    acts_b = _capture(loaded, format_prompts(tok, harmless), n_eoi, cfg, "harmless")
    acts = {k: torch.cat([acts_h[k], acts_b[k]]) for k in acts_h}
    y = np.array([1] * len(harmful) + [0] * len(harmless))
    split = split_indices(y, cfg.test_fraction, cfg.seed)
    t1 = time.perf_counter()
    rows, dirs, dirs_eoi = _layer_rows(acts, y, split, cfg, L)
    lens = [_lens_metric(loaded, acts[f"resid_pre.{l}"][:, -1], ids) for l in range(L)]
    final = _lens_metric(loaded, acts[f"resid_post.{L - 1}"][:, -1], ids)
    for row, m in zip(rows, lens, strict=True):
        row["lens_refusal_harmful"] = float(m[: len(harmful)].mean())
        row["lens_refusal_harmless"] = float(m[len(harmful):].mean())
    heads = _head_grid(acts, y, split, cfg, L)
    best = _best_layer(rows, cfg.layer_cutoff)
    summary = {
        "schema": SCAN_SCHEMA,
        "model": loaded.info.as_meta(),
        "settings": {**cfg.__dict__, "n_harmful": len(harmful), "n_harmless": len(harmless), "n_test": len(split[1])},
        "positions": {"eoi_token_ids": eoi_token_ids(tok), "probe": "last prompt token", "site": "resid_pre"},
        "refusal_token_ids": ids,
        "refusal_metric": {
            "harmful_mean": float(final[: len(harmful)].mean()),
            "harmless_mean": float(final[len(harmful):].mean()),
            "harmful_positive_frac": float((final[: len(harmful)] > 0).double().mean()),
        },
        "best_layer": best,
        "layers": rows,
        "heads": {"probe_test_acc": heads, "site": "head_out (o_proj input)", "position": "last prompt token"},
        "data": {"harmful_sha256": sha256_of_texts(harmful), "harmless_sha256": sha256_of_texts(harmless)},
        "timings_s": {"capture": round(t1 - t0, 2), "analysis": round(time.perf_counter() - t1, 2)},
    }
    art = Artifact(
        kind="scan_directions",
        tensors={
            "directions": dirs.float(), "directions_eoi": dirs_eoi.float(),
            "mean_harmful": _class_mean(acts, y, 1, L), "mean_harmless": _class_mean(acts, y, 0, L),
        },
        meta={"best_layer": best, "defense": "add", "site": "resid_pre", "position": "last prompt token",
              "refusal_token_ids": ids, "data": summary["data"], "config": summary["settings"]},
    )
    return ScanResult(summary=summary, artifact=art)


def _class_mean(acts: dict[str, Tensor], y: np.ndarray, label: int, L: int) -> Tensor:
    """Per-layer class mean at the last prompt token, [L, d] (float64 accumulation)."""
    mask = torch.as_tensor(y == label)
    return torch.stack([acts[f"resid_pre.{l}"][:, -1].double()[mask].mean(0) for l in range(L)]).float()
