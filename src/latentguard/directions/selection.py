"""Score refusal-direction candidates and select one (refusal_direction.md §5; paper App. C).

For each candidate r[p, l] (position p of the post-instruction tokens, block input l):
- `bypass`: mean refusal proxy on harmful val with r̂ ablated everywhere (lower is better);
- `induce`: mean refusal proxy on harmless val with +coef·r added at `resid_pre.l`;
- `kl`: mean KL(P_base ‖ P_ablated) at the last position on harmless val.
A candidate is discarded if a score is NaN, `l >= int((1 - prune_layer_fraction)·L)`,
`kl > kl_threshold` or `induce < induce_threshold`; the survivor with the lowest bypass wins.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from latentguard.directions.metrics import refusal_metric
from latentguard.errors import ConfigError
from latentguard.hooks import add_vectors, encode_batch, project_out
from latentguard.models import LoadedModel

__all__ = [
    "CandidateScores",
    "EncodedPrompts",
    "SelectionConfig",
    "candidate_failures",
    "encode_prompts",
    "kl_last",
    "last_logits",
    "layer_cutoff",
    "score_candidates",
    "scores_table",
    "select_direction",
]

_EPS_KL = 1e-6  # the repo's kl_div_fn epsilon


@dataclass
class SelectionConfig:
    kl_threshold: float = field(default=0.1, metadata={"help": "discard candidates whose ablation KL on harmless val exceeds this (spec §5)"})
    induce_threshold: float = field(default=0.0, metadata={"help": "discard candidates whose induce score is below this (the repo keeps 0)"})
    prune_layer_fraction: float = field(default=0.2, metadata={"help": "discard layers >= int((1 - f)·n_layers): late layers act on unembedding directions"})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.kl_threshold) and self.kl_threshold > 0):
            raise ConfigError(f"kl_threshold={self.kl_threshold}; use a finite value > 0 (spec: 0.1).")
        if not math.isfinite(self.induce_threshold):
            raise ConfigError(f"induce_threshold={self.induce_threshold}; use a finite value (spec: 0).")
        if not 0 <= self.prune_layer_fraction < 1:
            raise ConfigError(f"prune_layer_fraction={self.prune_layer_fraction}; use a value in [0, 1) (spec: 0.2).")


@dataclass
class CandidateScores:
    """Score grids [n_positions, n_layers] in float64; NaN where a candidate was not scored."""

    positions: list[int]  # negative position of each grid row
    bypass: Float[Tensor, "P L"]
    induce: Float[Tensor, "P L"]
    kl: Float[Tensor, "P L"]
    scored: Tensor  # bool [P, L]

    @classmethod
    def empty(cls, positions: Sequence[int], n_layers: int) -> CandidateScores:
        nan = torch.full((len(positions), n_layers), math.nan, dtype=torch.float64)
        return cls(list(positions), nan.clone(), nan.clone(), nan.clone(), torch.zeros(nan.shape, dtype=torch.bool))


@dataclass
class EncodedPrompts:
    """Formatted prompts tokenised once into left-padded forward batches."""

    texts: list[str]
    batches: list[dict[str, Tensor]]

    def __len__(self) -> int:
        return len(self.texts)


def encode_prompts(loaded: LoadedModel, texts: Sequence[str], batch_size: int) -> EncodedPrompts:
    device = next(loaded.model.parameters()).device
    batches = [
        encode_batch(loaded.tokenizer, texts[i : i + batch_size], device).forward_kwargs()
        for i in range(0, len(texts), batch_size)
    ]
    return EncodedPrompts(list(texts), batches)


@torch.no_grad()
def last_logits(loaded: LoadedModel, prompts: EncodedPrompts) -> Float[Tensor, "n vocab"]:
    """Logits at the last prompt position, CPU float32 (only that position is unembedded)."""
    out = [loaded.model(**b, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu() for b in prompts.batches]
    return torch.cat(out)


def kl_last(base: Float[Tensor, "n vocab"], other: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """KL(P_base ‖ P_other) per row, float64, with the repo's 1e-6 smoothing (§5)."""
    p_a = torch.softmax(base.double(), -1)
    p_b = torch.softmax(other.double(), -1)
    return (p_a * (torch.log(p_a + _EPS_KL) - torch.log(p_b + _EPS_KL))).sum(-1)


def layer_cutoff(n_layers: int, prune_layer_fraction: float) -> int:
    """First discarded layer: int(0.8·L) at the default fraction 0.2 (tolerant of 0.8·30 = 23.999…)."""
    return int((1 - prune_layer_fraction) * n_layers + 1e-9)


def candidate_failures(scores: CandidateScores, n_layers: int, cfg: SelectionConfig) -> list[list[list[str]]]:
    """Per candidate `[p][l]`, the filters it fails (empty list: it survives)."""
    cutoff = layer_cutoff(n_layers, cfg.prune_layer_fraction)
    grid: list[list[list[str]]] = []
    for i in range(len(scores.positions)):
        row = []
        for l in range(n_layers):
            b, s, k = (float(g[i, l]) for g in (scores.bypass, scores.induce, scores.kl))
            fails = []
            if not bool(scores.scored[i, l]):
                fails.append("not scored")
            elif any(math.isnan(v) for v in (b, s, k)):
                fails.append("nan score")
            if l >= cutoff:
                fails.append(f"layer >= {cutoff}")
            if k > cfg.kl_threshold:
                fails.append(f"kl {k:.3g} > {cfg.kl_threshold}")
            if s < cfg.induce_threshold:
                fails.append(f"induce {s:.3g} < {cfg.induce_threshold}")
            row.append(fails)
        grid.append(row)
    return grid


def select_direction(scores: CandidateScores, n_layers: int, cfg: SelectionConfig) -> tuple[int, int]:
    """(position row, layer) of the surviving candidate with the lowest bypass score.

    Raises ConfigError listing the five best-bypass candidates and the filters each failed.
    """
    fails = candidate_failures(scores, n_layers, cfg)
    ok = [(float(scores.bypass[i, l]), i, l) for i, row in enumerate(fails) for l, f in enumerate(row) if not f]
    if ok:
        _, i, l = min(ok)
        return i, l
    scored = [(float(scores.bypass[i, l]), i, l) for i in range(len(fails)) for l in range(n_layers) if bool(scores.scored[i, l])]
    best = sorted(scored, key=lambda t: (math.isnan(t[0]), t[0]))[:5]  # NaN (e.g. a zero direction) last
    listing = "; ".join(f"(pos {scores.positions[i]}, layer {l}, bypass {b:.3g}): {', '.join(fails[i][l])}" for b, i, l in best)
    raise ConfigError(
        f"No refusal-direction candidate passes the filters (best by bypass: {listing or 'none scored'}); "
        "score more layers/positions, or relax --kl-threshold / --induce-threshold / --prune-layer-fraction."
    )


def _mean_scores(
    loaded: LoadedModel, ctx: Callable[[], AbstractContextManager[None]], prompts: EncodedPrompts,
    refusal_ids: Sequence[int],
) -> tuple[Tensor, Tensor]:
    with ctx():
        logits = last_logits(loaded, prompts)
    return logits, refusal_metric(logits, refusal_ids)


def score_candidates(
    loaded: LoadedModel,
    candidates: Float[Tensor, "P L d"],
    positions: Sequence[int],
    todo: Sequence[tuple[int, int]],
    val: tuple[EncodedPrompts, EncodedPrompts],
    base_harmless: Float[Tensor, "n vocab"],
    refusal_ids: Sequence[int],
    coef: float = 1.0,
    progress: bool = True,
) -> CandidateScores:
    """Score candidates[(row, layer)] for each pair in `todo` (three passes each, §5).

    Args:
        val: (harmful val, harmless val) prompts.
        base_harmless: last-position logits of the unsteered model on harmless val (for KL).
    """
    harmful, harmless = val
    model = loaded.model
    scores = CandidateScores.empty(positions, candidates.shape[1])
    for i, l in tqdm(todo, desc="score candidates", unit="cand", disable=not progress):
        r = candidates[i, l]
        if not bool(torch.isfinite(r).all()) or float(r.norm()) == 0:
            scores.scored[i, l] = True  # scored as NaN: it fails the NaN filter
            continue
        ablate = functools.partial(project_out, model, r)
        add = functools.partial(add_vectors, model, {f"resid_pre.{l}": r}, coef)
        _, bypass = _mean_scores(loaded, ablate, harmful, refusal_ids)
        ablated, _ = _mean_scores(loaded, ablate, harmless, refusal_ids)
        _, induce = _mean_scores(loaded, add, harmless, refusal_ids)
        scores.bypass[i, l] = bypass.mean()
        scores.induce[i, l] = induce.mean()
        scores.kl[i, l] = kl_last(base_harmless, ablated).mean()
        scores.scored[i, l] = True
    return scores


def scores_table(scores: CandidateScores, fails: list[list[list[str]]]) -> list[dict[str, Any]]:
    """One JSON row per scored candidate (NaN written as null)."""
    rows = []
    for i, p in enumerate(scores.positions):
        for l in range(scores.bypass.shape[1]):
            if not bool(scores.scored[i, l]):
                continue
            vals = {k: float(getattr(scores, k)[i, l]) for k in ("bypass", "induce", "kl")}
            rows.append({"position": p, "layer": l, **{k: None if math.isnan(v) else v for k, v in vals.items()},
                         "passed": not fails[i][l], "failed": fails[i][l]})
    return rows
