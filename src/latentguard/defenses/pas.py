"""PAS, Personality Activation Search (arXiv 2408.11779; pas.md): SafetyLock's per-head machinery fitted
to one person's questionnaire answers, with the strength α searched on held-out items.

Faithful to the released code: the site (every head's o_proj input), the contrast (each item answered
'A' = very accurate vs 'E' = very inaccurate), the per-person labels (answer > 3: 'A' is label 1;
< 3: 'E' is; 3 or unknown: skipped), the top-K=24 heads by probe accuracy, u = unit mass-mean,
σ = std of projections, δ = α·σ·u, and α chosen to minimise the sum over the five traits of the
mean absolute Likert error. The fitted lock is a `headlock` artefact (method "pas") and applies like
SafetyLock (`--defense pas:DIR`, hook or folded bias).

Reconstructed (the paper's data, bugs and unstated details replaced; pas.md §3, §4, §7, §8):
- items: 40 project-written self-descriptions (8 per OCEAN trait, 4 reverse-keyed), not PAPI/IPIP text;
- subjects: a trait profile (`O=high,C=low,...`) or a JSON file of answers, not PAPI-300K people;
- position: the answer-letter token (the code read a template token where 'A' and 'E' are identical);
- splits: items are split per trait into extraction / α-validation / test; α is chosen on validation
  items only (the code chose it on the reported test items), and probes are scored on a split by item;
- scorer: the expected Likert value of the next-token distribution over the five letters (pas.md §4),
  not parsing generated text; the α grid adds 12;
- not reproduced: the in-context copy of the person's 120 answers (coded PAS = steering + persona).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from latentguard.artifacts import sha256_of_texts
from latentguard.defenses import DEFENSES
from latentguard.defenses.safetylock import SafetyLockDefense, lock_hooks
from latentguard.directions.heads import (
    HeadLock,
    build_head_lock,
    collect_answer_heads,
    fit_heads,
    format_answers,
    render_chat,
    select_heads,
)
from latentguard.errors import ConfigError, DataError
from latentguard.hooks import encode_batch
from latentguard.models import LoadedModel

__all__ = ["PAS_ITEMS", "PasConfig", "PasDefense", "PasItem", "PasResult", "answers_from_profile", "fit_pas",
           "letter_scores", "likert_error", "pas_activations", "read_answers", "split_items"]

TRAITS = ("O", "C", "E", "A", "N")
LETTERS = "ABCDE"  # A = very accurate (5) ... E = very inaccurate (1)


@dataclass(frozen=True)
class PasItem:
    id: str
    text: str  # completes "You ..."
    trait: str
    key: int  # +1: agreeing means more of the trait; -1: reverse-keyed


def _items(trait: str, plus: Sequence[str], minus: Sequence[str]) -> list[PasItem]:
    return [PasItem(f"{trait}{i + 1}", t, trait, 1) for i, t in enumerate(plus)] + [
        PasItem(f"{trait}{i + 5}", t, trait, -1) for i, t in enumerate(minus)]


PAS_ITEMS: tuple[PasItem, ...] = tuple(
    _items("O", ["love trying foods you have never eaten", "often get lost in thought about abstract ideas",
                 "seek out museums and concerts", "enjoy puzzles that have no single answer"],
           ["prefer a routine that never changes", "find poetry boring", "avoid films with unusual plots",
            "stick to the opinions you grew up with"])
    + _items("C", ["finish tasks well before the deadline", "keep your desk tidy", "plan your week in advance",
                   "double-check your work for mistakes"],
             ["leave chores half done", "forget appointments", "make decisions on a whim", "lose track of your belongings"])
    + _items("E", ["start conversations with strangers", "feel energised after a party", "enjoy being the centre of attention",
                   "talk a lot in group meetings"],
             ["prefer to spend evenings alone", "keep quiet around people you do not know", "avoid large crowds",
              "let others lead the conversation"])
    + _items("A", ["go out of your way to help others", "trust what people tell you", "forgive people easily",
                   "care about how others feel"],
             ["insult people when you are annoyed", "put your own interests first", "enjoy arguing to win",
              "have little sympathy for people in trouble"])
    + _items("N", ["worry about things that might go wrong", "get upset easily", "feel anxious before small events",
                   "have frequent mood swings"],
             ["stay calm under pressure", "rarely feel sad", "recover quickly from setbacks", "feel relaxed most of the time"])
)


@dataclass
class PasConfig:
    profile: str = field(default="O=low,C=low,E=high,A=high,N=high", metadata={"help": "synthetic subject: high/low per trait O,C,E,A,N (pas.md §8 S1)"})
    answers: str | None = field(default=None, metadata={"help": "JSON file {item_id: 1..5} of a real subject's answers; overrides --profile"})
    k: int = field(default=24, metadata={"help": "heads kept, by held-out probe accuracy"})
    alphas: str = field(default="0,1,2,4,6,8,12", metadata={"help": "comma list of strengths searched on the validation items"})
    extract_fraction: float = field(default=0.5, metadata={"help": "share of each trait's items used to fit the heads"})
    val_fraction: float = field(default=0.25, metadata={"help": "share of each trait's items used to choose alpha (the rest is test)"})
    probe_val_fraction: float = field(default=0.4, metadata={"help": "share of extraction items held out to score each head's probe"})
    seed: int = field(default=0, metadata={"help": "seed of the item split and the probe split"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    system: str = field(default="You are a helpful, honest and concise assistant.", metadata={"help": "system prompt"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k={self.k}; keep at least 1 head.")
        if not (0 < self.extract_fraction and 0 < self.val_fraction and self.extract_fraction + self.val_fraction < 1):
            raise ConfigError(f"extract_fraction={self.extract_fraction}, val_fraction={self.val_fraction}; "
                              "both > 0 with a sum < 1, so test items remain.")
        if not self.alpha_grid():
            raise ConfigError(f"alphas={self.alphas!r}; pass a comma list of numbers such as 0,1,2,4.")

    def alpha_grid(self) -> list[float]:
        try:
            grid = sorted({float(a) for a in self.alphas.split(",") if a.strip()})
        except ValueError as e:
            raise ConfigError(f"alphas={self.alphas!r}: {e}; pass a comma list of numbers.") from e
        if not all(math.isfinite(a) for a in grid):
            raise ConfigError(f"alphas={self.alphas!r}; pass finite numbers.")
        return grid


def answers_from_profile(profile: str, items: Sequence[PasItem] = PAS_ITEMS) -> dict[str, int]:
    """`O=high,C=low,...` -> {item id: 5 or 1}: agree with items keyed towards the profile, disagree otherwise."""
    level: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in profile.split(","))):
        t, _, v = part.partition("=")
        if t not in TRAITS or v not in ("high", "low"):
            raise ConfigError(f"Bad profile entry {part!r}; write TRAIT=high|low with TRAIT in {','.join(TRAITS)}.")
        level[t] = 1 if v == "high" else -1
    if set(level) != set(TRAITS):
        raise ConfigError(f"Profile {profile!r} lacks {sorted(set(TRAITS) - set(level))}; give all five traits.")
    return {it.id: 5 if level[it.trait] * it.key > 0 else 1 for it in items}


def read_answers(path: str | Path, items: Sequence[PasItem] = PAS_ITEMS) -> dict[str, int]:
    """A subject's answers from JSON `{item_id: 1..5}` (0 = unknown); unknown ids are an error."""
    data = json.loads(Path(path).read_text())
    ids = {it.id for it in items}
    bad = sorted(k for k, v in data.items() if k not in ids or v not in (0, 1, 2, 3, 4, 5))
    if bad:
        raise DataError(f"{path}: entries {bad[:5]} are not item ids with answers 0..5; ids are {sorted(ids)[:5]}....")
    return {k: int(v) for k, v in data.items()}


def split_items(items: Sequence[PasItem], cfg: PasConfig) -> tuple[list[PasItem], list[PasItem], list[PasItem]]:
    """Per trait, a seeded split into extraction / α-validation / test items (pas.md §3: α never sees test)."""
    rng = np.random.default_rng(cfg.seed)
    parts: tuple[list[PasItem], list[PasItem], list[PasItem]] = ([], [], [])
    for t in TRAITS:
        group = [items[i] for i in rng.permutation([i for i, it in enumerate(items) if it.trait == t])]
        n_ex = max(1, round(cfg.extract_fraction * len(group)))
        n_val = max(1, round(cfg.val_fraction * len(group)))
        if len(group) < n_ex + n_val + 1:
            raise DataError(f"Trait {t} has {len(group)} items; the split needs at least {n_ex + n_val + 1}.")
        parts[0].extend(group[:n_ex])
        parts[1].extend(group[n_ex : n_ex + n_val])
        parts[2].extend(group[n_ex + n_val :])
    return parts


def _question(item: PasItem) -> str:
    return (f'Statement: "You {item.text}."\nHow accurately does this statement describe you? Reply with one letter.\n'
            "(A) Very accurate\n(B) Moderately accurate\n(C) Neither accurate nor inaccurate\n"
            "(D) Moderately inaccurate\n(E) Very inaccurate")


def pas_activations(loaded: LoadedModel, items: Sequence[PasItem], cfg: PasConfig) -> Float[Tensor, "two_n layers heads head_dim"]:
    """Head activations at the answer-letter token: rows [A for every item] + [E for every item]."""
    chats = [(_question(it), "A") for it in items] + [(_question(it), "E") for it in items]
    answers = format_answers(loaded.tokenizer, chats, cfg.system)
    ids = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in answers.texts]
    letter = [row[p + a - 1] for row, p, a in zip(ids, answers.n_prompt, answers.n_answer)]
    n = len(items)
    if any(letter[i] == letter[n + i] for i in range(n)):
        raise DataError("The 'A' and 'E' answers end in the same token; use a tokenizer that spells single letters.")
    x, _ = collect_answer_heads(loaded, answers, 1, cfg.batch_size, progress="pas: forward")
    return x[:, 0]


def _letter_ids(tok: Any) -> list[list[int]]:
    out = []
    for letter in LETTERS:
        ids = {tok(v, add_special_tokens=False)["input_ids"][0] for v in (letter, " " + letter)
               if len(tok(v, add_special_tokens=False)["input_ids"]) == 1}
        if not ids:
            raise DataError(f"The tokenizer has no single token for {letter!r}; PAS's letter scorer needs one.")
        out.append(sorted(ids))
    return out


@torch.no_grad()
def letter_scores(loaded: LoadedModel, items: Sequence[PasItem], cfg: PasConfig) -> list[float]:
    """Expected Likert value Σ p(letter)·value at the answer position, letters renormalised (pas.md §4)."""
    tok = loaded.tokenizer
    texts = [render_chat(tok, cfg.system, _question(it)) for it in items]
    groups, values = _letter_ids(tok), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    out: list[float] = []
    for start in range(0, len(texts), cfg.batch_size):
        batch = encode_batch(tok, texts[start : start + cfg.batch_size], next(loaded.model.parameters()).device)
        probs = loaded.model(**batch.forward_kwargs(), use_cache=False).logits[:, -1].double().softmax(-1).cpu()
        p = torch.stack([probs[:, g].max(-1).values for g in groups], -1)
        out.extend((p / p.sum(-1, keepdim=True) @ values).tolist())
    return out


def likert_error(items: Sequence[PasItem], predicted: Sequence[float], answers: dict[str, int]) -> dict[str, float]:
    """Per trait, mean |predicted − answer| over items with a known answer; `total` sums the traits (0–20)."""
    err: dict[str, list[float]] = {t: [] for t in TRAITS}
    for it, p in zip(items, predicted, strict=True):
        if answers.get(it.id, 0):
            err[it.trait].append(abs(p - answers[it.id]))
    per = {t: float(np.mean(v)) for t, v in err.items() if v}
    return {**per, "total": sum(per.values())}


def _labels(items: Sequence[PasItem], answers: dict[str, int]) -> tuple[Tensor, Tensor, np.ndarray]:
    """Row indices into the [A..., E...] activations, labels and item groups; neutral/unknown items skipped."""
    n = len(items)
    rows, labels, groups = [], [], []
    for i, it in enumerate(items):
        a = answers.get(it.id, 0)
        if a in (0, 3):
            continue
        rows += [i, n + i]
        labels += [1, 0] if a > 3 else [0, 1]
        groups += [i, i]
    if len(set(groups)) < 2:
        raise DataError("Fewer than 2 extraction items have a non-neutral answer; PAS needs the subject's opinions.")
    return torch.tensor(rows), torch.tensor(labels), np.array(groups)


@dataclass
class PasResult:
    lock: HeadLock
    report: dict[str, Any]


def fit_pas(loaded: LoadedModel, answers: dict[str, int], cfg: PasConfig, items: Sequence[PasItem] = PAS_ITEMS,
            acts: Tensor | None = None, progress: bool = True) -> PasResult:
    """Fit one subject: heads on extraction items, α on validation items, error reported on test items.

    `acts` (from `pas_activations` on the extraction items) can be shared across subjects.
    """
    t0 = time.perf_counter()
    extract, val, test = split_items(items, cfg)
    x = pas_activations(loaded, extract, cfg) if acts is None else acts
    rows, y, groups = _labels(extract, answers)
    fit = fit_heads(x[rows], y, groups, cfg.probe_val_fraction, cfg.seed, progress)
    meta = {"defense": "pas", "method": "pas", "site": "o_proj_input", "sign": "+alpha -> the subject's answers",
            "r_tokens": 1, "position": "answer letter", "system_prompt": cfg.system, "config": {**cfg.__dict__},
            "base_model": loaded.info.model_id, "architecture": loaded.info.architecture, "default_alpha": 0.0,
            "dataset": {"name": "pas-items-v1", "n_items": len(extract), "sha256": sha256_of_texts([it.text for it in items]),
                        "answers_sha256": sha256_of_texts([f"{k}={v}" for k, v in sorted(answers.items())])}}
    lock = build_head_lock(fit, select_heads(fit, cfg.k), meta)
    curve: list[dict[str, Any]] = []
    for alpha in cfg.alpha_grid():
        with lock_hooks(loaded.model, lock, alpha):
            curve.append({"alpha": alpha, "val": likert_error(val, letter_scores(loaded, val, cfg), answers),
                          "test": likert_error(test, letter_scores(loaded, test, cfg), answers)})
    best = min(curve, key=lambda c: (c["val"]["total"], abs(c["alpha"])))  # ties: the weakest shift
    lock.meta["default_alpha"] = best["alpha"]
    report = {"chosen_alpha": best["alpha"], "curve": curve, "items": {"extract": [i.id for i in extract],
              "val": [i.id for i in val], "test": [i.id for i in test]}, "heads": lock.meta["K"],
              "timings_s": {"total": round(time.perf_counter() - t0, 2)}}
    return PasResult(lock, report)


@DEFENSES.register("pas")
class PasDefense(SafetyLockDefense):
    """A PAS lock applied like SafetyLock: δ = α·σ·u on the o_proj input (α: the searched one by default)."""

    key = "pas"
