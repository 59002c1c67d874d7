"""The refusal direction by difference in means (refusal_direction.md; Arditi et al. 2024).

`extract_refusal_direction` takes raw prompts (the CLI samples and dedupes them, §2):
1. refusal tokens R: given, the model family's known list (§3), or derived from the model's own
   greedy refusals on harmful train (first tokens covering >= 90%, always with "I"), else "I";
2. one tapped pass per train set: float64 means of `resid_pre.l` at every post-instruction
   position of the prompts the proxy keeps (harmful > 0, harmless < 0) -> r[p, l] (§4);
3. one base pass per val set (filter, KL reference, condition calibration);
4. bypass / induce / KL per candidate and selection (`directions.selection`, §5).
The result is a `refusal_direction` artefact holding r, r̂, every candidate and score grid.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentguard.artifacts import Artifact, sha256_of_texts
from latentguard.directions.metrics import refusal_metric, refusal_token_ids
from latentguard.directions.selection import (
    CandidateScores,
    EncodedPrompts,
    SelectionConfig,
    candidate_failures,
    encode_prompts,
    layer_cutoff,
    score_candidates,
    scores_table,
    select_direction,
)
from latentguard.errors import ConfigError, DataError
from latentguard.hooks import capture
from latentguard.models import LoadedModel, eoi_token_ids, format_prompts

__all__ = [
    "KNOWN_REFUSAL_TOKENS",
    "REFUSAL_SUBSTRINGS",
    "RefusalData",
    "RefusalDirectionConfig",
    "RefusalDirectionResult",
    "RefusalTokens",
    "calibrate_threshold",
    "cover_tokens",
    "extract_refusal_direction",
    "is_refusal",
    "resolve_refusal_tokens",
]

SCORES_SCHEMA = 1

# §7: the repo's substring judge (case-insensitive).
REFUSAL_SUBSTRINGS = (
    "I'm sorry", "I am sorry", "I apologize", "As an AI", "As a language model", "As an assistant",
    "I cannot", "I can't", "I am unable to", "I'm unable to", "I am not able to", "I'm not able to",
)

# §3: R for the paper's model families, keyed by (model_type, vocab size).
KNOWN_REFUSAL_TOKENS: dict[tuple[str, int], tuple[int, ...]] = {
    ("llama", 32000): (306,),  # Llama-2 "I"
    ("llama", 128256): (40,),  # Llama-3 "I"
    ("gemma", 256000): (235285,),  # Gemma "I"
    ("llama", 64000): (59597,),  # Yi
    ("qwen", 151936): (40, 2121),  # Qwen v1 "I", "As"
}


@dataclass
class RefusalDirectionConfig(SelectionConfig):
    n_train: int = field(default=128, metadata={"help": "prompts sampled per train set (spec: 128)"})
    n_val: int = field(default=32, metadata={"help": "prompts sampled per val set (spec: 32)"})
    seed: int = field(default=42, metadata={"help": "seed of the samples (spec: 42)"})
    filter_train: bool = field(default=True, metadata={"help": "keep harmful train with proxy > 0 and harmless with < 0"})
    filter_val: bool = field(default=True, metadata={"help": "the same filter on the val sets"})
    positions: str | None = field(default=None, metadata={"help": "post-instruction positions to score, e.g. -1,-2 (default: all)"})
    layers: str | None = field(default=None, metadata={"help": "layers to score: comma list or START:STOP[:STEP] (default: all below the cut-off)"})
    refusal_tokens: str | None = field(default=None, metadata={"help": "comma-separated refusal words (default: the family's known list, else derived from the model's refusals)"})
    n_refusal_probe: int = field(default=32, metadata={"help": "harmful train prompts generated to derive the refusal tokens"})
    refusal_probe_tokens: int = field(default=24, metadata={"help": "greedy tokens per derivation response"})
    refusal_coverage: float = field(default=0.9, metadata={"help": "derived refusal tokens cover this share of the refusals' first tokens"})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass"})
    system: str | None = field(default=None, metadata={"help": "system prompt (default: the chat template's own; used throughout)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_train", "n_val", "n_refusal_probe", "refusal_probe_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; use >= 1.")
        if not 0 < self.refusal_coverage <= 1:
            raise ConfigError(f"refusal_coverage={self.refusal_coverage}; use a value in (0, 1].")

    def position_list(self, n_eoi: int) -> list[int]:
        if self.positions is None:
            return list(range(-n_eoi, 0))
        pos = _int_list(self.positions, "positions")
        bad = [p for p in pos if not -n_eoi <= p <= -1]
        if bad:
            raise ConfigError(f"positions {bad} are outside the {n_eoi} post-instruction tokens; use -{n_eoi}..-1.")
        return sorted(set(pos))

    def layer_list(self, n_layers: int) -> list[int]:
        cutoff = layer_cutoff(n_layers, self.prune_layer_fraction)
        if self.layers is None:
            return list(range(cutoff))
        text = self.layers.strip()
        if ":" in text:
            parts = _int_list(text.replace(":", ","), "layers")
            layers = list(range(*parts)) if 2 <= len(parts) <= 3 else []
        else:
            layers = _int_list(text, "layers")
        bad = [l for l in layers if not -n_layers <= l < n_layers]
        if not layers or bad:
            raise ConfigError(f"layers={self.layers!r} names no layer or layers {bad} out of range; use 0..{n_layers - 1}.")
        return sorted({l % n_layers for l in layers})


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{name}={text!r}; write integers separated by commas.") from e


@dataclass
class RefusalData:
    """Raw prompts of the four sets (already sampled and deduplicated)."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]

    def check(self) -> None:
        for name, texts in asdict(self).items():
            if not texts:
                raise DataError(f"The {name} set is empty; pass a file with prompts or raise its sample size.")

    def hashes(self) -> dict[str, str]:
        return {f"{k}_sha256": sha256_of_texts(v) for k, v in asdict(self).items()}


@dataclass
class RefusalTokens:
    ids: list[int]
    source: str  # given | known | derived | fallback
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefusalDirectionResult:
    artifact: Artifact  # kind "refusal_direction"
    scores: dict[str, Any]  # scores.json


def is_refusal(text: str) -> bool:
    """The §7 substring judge."""
    low = text.lower()
    return any(s.lower() in low for s in REFUSAL_SUBSTRINGS)


@torch.no_grad()
def _greedy(loaded: LoadedModel, texts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy new-token ids per formatted prompt (left-padded batches)."""
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)  # type: ignore[operator]
        out.extend(gen[:, enc["input_ids"].shape[1] :].tolist())
    return out


def _derive(loaded: LoadedModel, formatted: Sequence[str], cfg: RefusalDirectionConfig) -> RefusalTokens:
    """§3: first tokens of the model's greedy refusals, smallest set covering the coverage share, plus "I"."""
    tok = loaded.tokenizer
    i_id = refusal_token_ids(tok, ["I"])[0]
    probe = list(formatted[: cfg.n_refusal_probe])
    firsts = [ids[0] for ids in _greedy(loaded, probe, cfg.refusal_probe_tokens, cfg.batch_size)
              if ids and is_refusal(str(tok.decode(ids, skip_special_tokens=True)))]
    detail = {"n_probed": len(probe), "n_refusals": len(firsts), "first_token_counts": {}}
    if not firsts:
        return RefusalTokens([i_id], "fallback", detail)
    detail["first_token_counts"] = {tok.convert_ids_to_tokens(t): c for t, c in Counter(firsts).most_common()}
    return RefusalTokens(cover_tokens(firsts, cfg.refusal_coverage, i_id), "derived", detail)


def cover_tokens(first_ids: Sequence[int], coverage: float, always: int) -> list[int]:
    """Smallest set of ids (most frequent first) covering `coverage` of `first_ids`, plus `always`."""
    counts = Counter(first_ids)
    chosen, covered = {always}, counts.get(always, 0)  # "I" is always in R, so its refusals count
    for t, c in counts.most_common():
        if covered >= coverage * len(first_ids):
            break
        if t not in chosen:
            chosen.add(t)
            covered += c
    return sorted(chosen)


def resolve_refusal_tokens(loaded: LoadedModel, harmful_formatted: Sequence[str], cfg: RefusalDirectionConfig) -> RefusalTokens:
    """R from the config's words, else the known family list, else derived (§3)."""
    if cfg.refusal_tokens:
        words = [w.strip() for w in cfg.refusal_tokens.split(",") if w.strip()]
        return RefusalTokens(refusal_token_ids(loaded.tokenizer, words), "given", {"words": words})
    known = KNOWN_REFUSAL_TOKENS.get((loaded.info.model_type, loaded.info.vocab_size))
    if known is not None:
        return RefusalTokens(list(known), "known")
    return _derive(loaded, harmful_formatted, cfg)


def _keep(metric: Tensor, sign: int, enabled: bool) -> Tensor:
    """§2 filter: harmful (sign +1) keeps metric > 0, harmless (sign -1) keeps metric < 0."""
    return (metric * sign > 0) if enabled else torch.ones_like(metric, dtype=torch.bool)


@torch.no_grad()
def _train_mean(
    loaded: LoadedModel, prompts: EncodedPrompts, n_pos: int, ids: Sequence[int], sign: int, enabled: bool
) -> tuple[Float[Tensor, "P L d"], Tensor, int]:
    """Float64 mean of resid_pre.l at the last n_pos positions over the kept prompts (§4)."""
    sites = [f"resid_pre.{l}" for l in range(loaded.info.n_layers)]
    total: Tensor | None = None
    metrics, kept = [], 0
    with capture(loaded.model, sites, reduce=lambda x: x[:, -n_pos:]) as rec:
        for b in prompts.batches:
            logits = loaded.model(**b, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu()
            m = refusal_metric(logits, ids)
            keep = _keep(m, sign, enabled)
            acts = torch.stack([rec[s].pop() for s in sites], dim=2)[keep].double()  # [k, P, L, d]
            total = acts.sum(0) if total is None else total + acts.sum(0)
            metrics.append(m)
            kept += int(keep.sum())
    if kept == 0 or total is None:
        return torch.empty(0), torch.cat(metrics), 0
    return total / kept, torch.cat(metrics), kept


@torch.no_grad()
def _val_pass(loaded: LoadedModel, prompts: EncodedPrompts, ids: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(last-position logits, proxy, last-token resid_pre at every layer [n, L, d]) of the base model."""
    sites = [f"resid_pre.{l}" for l in range(loaded.info.n_layers)]
    logits, acts = [], []
    with capture(loaded.model, sites, reduce=lambda x: x[:, -1]) as rec:
        for b in prompts.batches:
            logits.append(loaded.model(**b, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu())
            acts.append(torch.stack([rec[s].pop() for s in sites], dim=1))
    lg = torch.cat(logits)
    return lg, refusal_metric(lg, ids), torch.cat(acts)


def calibrate_threshold(positive: Tensor, negative: Tensor) -> tuple[float, float]:
    """Threshold t (score > t means positive) with the best balanced accuracy, and that accuracy."""
    pos, neg = positive.double(), negative.double()
    vals = torch.cat([pos, neg]).unique(sorted=True)
    cuts = torch.cat([vals[:1] - 1e-6, (vals[1:] + vals[:-1]) / 2, vals[-1:] + 1e-6])
    best = (-1.0, 0.0)
    for t in cuts.tolist():
        acc = 0.5 * (float((pos > t).double().mean()) + float((neg <= t).double().mean()))
        if acc > best[0]:
            best = (acc, t)
    return best[1], best[0]


def _condition(val_acts: tuple[Tensor, Tensor], r: Tensor, layer: int) -> dict[str, Any]:
    """CAST-style gate for `conditional`: cosine of the last prompt token with r̂ at resid_pre.layer."""
    unit = r.double() / r.double().norm()
    cos = [torch.nn.functional.cosine_similarity(a[:, layer].double(), unit[None], dim=-1) for a in val_acts]
    thr, acc = calibrate_threshold(cos[0], cos[1])
    return {"layer": layer, "threshold": thr, "balanced_accuracy": acc, "score": "cosine(resid_pre[layer][-1], r̂)",
            "harmful_mean": float(cos[0].mean()), "harmless_mean": float(cos[1].mean()), "data": "val (after filter)"}


@dataclass
class _Prepared:
    """Everything computed before candidate scoring."""

    tokens: RefusalTokens
    eoi: list[int]
    candidates: Tensor  # [P_all, L, d] float64
    val: tuple[EncodedPrompts, EncodedPrompts]
    base_harmless: Tensor
    val_acts: tuple[Tensor, Tensor]
    counts: dict[str, int]
    baseline: dict[str, float]


def _prepare(loaded: LoadedModel, data: RefusalData, cfg: RefusalDirectionConfig) -> _Prepared:
    tok = loaded.tokenizer
    eoi = eoi_token_ids(tok, cfg.system)
    fmt = {k: format_prompts(tok, v, cfg.system) for k, v in asdict(data).items()}
    tokens = resolve_refusal_tokens(loaded, fmt["harmful_train"], cfg)
    ids = tokens.ids
    counts: dict[str, int] = {f"{k}_sampled": len(v) for k, v in fmt.items()}
    baseline: dict[str, float] = {}
    means = []
    for name, sign, enabled in (("harmful_train", 1, cfg.filter_train), ("harmless_train", -1, cfg.filter_train)):
        mean, metric, kept = _train_mean(loaded, encode_prompts(loaded, fmt[name], cfg.batch_size), len(eoi), ids, sign, enabled)
        _check_kept(name, kept, "--no-filter-train")
        counts[f"{name}_kept"], baseline[f"{name}_proxy_mean"] = kept, float(metric.mean())
        means.append(mean)
    val, acts, base = [], [], torch.empty(0)
    for name, sign in (("harmful_val", 1), ("harmless_val", -1)):
        logits, metric, act = _val_pass(loaded, encode_prompts(loaded, fmt[name], cfg.batch_size), ids)
        keep = _keep(metric, sign, cfg.filter_val)
        _check_kept(name, int(keep.sum()), "--no-filter-val")
        counts[f"{name}_kept"], baseline[f"{name}_proxy_mean"] = int(keep.sum()), float(metric.mean())
        val.append(encode_prompts(loaded, [t for t, k in zip(fmt[name], keep.tolist()) if k], cfg.batch_size))
        acts.append(act[keep])
        if sign < 0:  # KL reference: the unsteered model on harmless val
            base = logits[keep]
    return _Prepared(tokens, eoi, means[0] - means[1], (val[0], val[1]), base, (acts[0], acts[1]), counts, baseline)


def _check_kept(name: str, kept: int, flag: str) -> None:
    if kept == 0:
        raise DataError(
            f"The refusal-proxy filter kept 0 {name} prompts (the model's proxy does not separate them: does it refuse?); "
            f"pass {flag}, use a model that refuses, or check the refusal tokens."
        )


def extract_refusal_direction(
    loaded: LoadedModel, data: RefusalData, cfg: RefusalDirectionConfig, progress: bool = True
) -> RefusalDirectionResult:
    """Extract, score and select the refusal direction of `loaded` (see module docstring)."""
    data.check()
    t0 = time.perf_counter()
    n_layers, n_eoi = loaded.info.n_layers, len(eoi_token_ids(loaded.tokenizer, cfg.system))
    all_pos = list(range(-n_eoi, 0))
    todo = [(all_pos.index(p), l) for p in cfg.position_list(n_eoi) for l in cfg.layer_list(n_layers)]  # checked before the slow part
    prep = _prepare(loaded, data, cfg)
    t1 = time.perf_counter()
    scores = score_candidates(loaded, prep.candidates, all_pos, todo, prep.val, prep.base_harmless, prep.tokens.ids,
                              progress=progress)
    i, l = select_direction(scores, n_layers, cfg)
    r = prep.candidates[i, l]
    condition = _condition(prep.val_acts, r, l)
    summary = _summary(loaded, data, cfg, prep, scores, (i, l), condition)
    summary["timings_s"] = {"prepare": round(t1 - t0, 2), "score": round(time.perf_counter() - t1, 2)}
    art = Artifact(
        kind="refusal_direction",
        tensors={"direction": r.float(), "direction_unit": (r / r.norm()).float(), "candidates": prep.candidates.float(),
                 "bypass": scores.bypass, "induce": scores.induce, "kl": scores.kl},
        meta={"defense": "ablate", "layer": l, "position": all_pos[i], "position_index": i, "site": "resid_pre",
              "positions": all_pos, "eoi_token_ids": prep.eoi, "refusal_token_ids": prep.tokens.ids,
              "refusal_tokens": summary["refusal_tokens"], "condition": condition, "config": asdict(cfg),
              "data": data.hashes(), "counts": prep.counts, "system_prompt": _system_form(cfg)},
    )
    return RefusalDirectionResult(artifact=art, scores=summary)


def _system_form(cfg: RefusalDirectionConfig) -> str:
    return "template default" if cfg.system is None else f"given: {cfg.system!r}"


def _summary(
    loaded: LoadedModel, data: RefusalData, cfg: RefusalDirectionConfig, prep: _Prepared,
    scores: CandidateScores, chosen: tuple[int, int], condition: dict[str, Any],
) -> dict[str, Any]:
    i, l = chosen
    fails = candidate_failures(scores, loaded.info.n_layers, cfg)
    r = prep.candidates[i, l]
    grid = {k: [[None if math.isnan(v) else v for v in row] for row in getattr(scores, k).tolist()]
            for k in ("bypass", "induce", "kl")}
    return {
        "schema": SCORES_SCHEMA,
        "kind": "refusal_direction_scores",
        "model": loaded.info.as_meta(),
        "selected": {"position": scores.positions[i], "layer": l, "norm": float(r.norm()),
                     **{k: float(getattr(scores, k)[i, l]) for k in ("bypass", "induce", "kl")}},
        "settings": asdict(cfg),
        "layer_cutoff": layer_cutoff(loaded.info.n_layers, cfg.prune_layer_fraction),
        "positions": scores.positions,
        "eoi_token_ids": prep.eoi,
        "eoi_tokens": loaded.tokenizer.convert_ids_to_tokens(prep.eoi),
        "system_prompt": _system_form(cfg),
        "refusal_tokens": {"ids": prep.tokens.ids, "tokens": loaded.tokenizer.convert_ids_to_tokens(prep.tokens.ids),
                           "source": prep.tokens.source, **prep.tokens.detail},
        "counts": prep.counts,
        "baseline": prep.baseline,
        "condition": condition,
        "data": data.hashes(),
        "grids": grid,
        "candidates": scores_table(scores, fails),
    }
