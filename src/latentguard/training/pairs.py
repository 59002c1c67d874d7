"""Safety preference pairs (fpo.md §8), and the text mix an SAE for FPO is trained on.

- harmful prompt → chosen: one of our refusals (`reference_data.REFUSALS`, picked by a hash of the
  prompt); rejected: the model's own greedy compliance, or the AdvBench affirmative target when the
  model's reply is empty or itself a refusal. Prompts are the AdvBench goals that also sit in
  `refusal_direction_splits/harmful_train` (never in the `advbench-heldout` test split), then
  safety-tuned-llamas instructions de-duplicated against every eval set.
- benign prompt (Alpaca `harmless_train`, de-duplicated) → chosen: the model's own greedy answer
  (refusals and empty answers dropped); rejected: a refusal, so over-refusal is never rewarded.
The file is JSONL with `prompt`, `chosen`, `rejected`, `kind` (harmful|benign) and `source`.
`sae_texts` gathers (prompt, response) texts from named sets, files and pairs files for `sae train`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentguard.artifacts import write_json
from latentguard.errors import ConfigError, DataError, OutputExistsError
from latentguard.models import load_model
from latentguard.training import reference_data as rd
from latentguard.training.data import load_spec, parse_data_spec
from latentguard.training.preference import read_preference_pairs
from latentguard.training.reference import greedy

__all__ = ["DEFAULT_SAE_DATA", "PairsConfig", "build_safety_pairs", "sae_texts"]

# Refusals, worked answers and affirmative harmful openings: the text FPO's pairs are made of.
DEFAULT_SAE_DATA = ("safety:2000", "gsm8k-train:2000", "advbench-targets")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class PairsConfig:
    out: str = field(default="out/pairs.jsonl", metadata=_h("output JSONL (a .manifest.json is written beside it)"))
    model: str = field(default="embedded", metadata=_h("model whose own replies fill the compliant / helpful sides"))
    n_harmful: int = field(default=48, metadata=_h("harmful prompts: refusal chosen, compliance rejected"))
    n_benign: int = field(default=16, metadata=_h("benign prompts: helpful answer chosen, refusal rejected"))
    max_new_tokens: int = field(default=48, metadata=_h("greedy tokens per model reply"))
    batch_size: int = field(default=16, metadata=_h("prompts per generation batch"))
    seed: int = field(default=42, metadata=_h("seed of the prompt samples"))
    data_dir: str | None = field(default=None, metadata=_h("shared data folder (default: found automatically)"))
    overwrite: bool = field(default=False, metadata=_h("replace an existing output file"))

    def __post_init__(self) -> None:
        if self.n_harmful < 0 or self.n_benign < 0 or self.n_harmful + self.n_benign == 0:
            raise ConfigError(f"n_harmful={self.n_harmful}, n_benign={self.n_benign}; ask for at least one pair.")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be >= 1.")


def _harmful_prompts(data: Path, evals: rd.EvalSets, n: int, seed: int) -> list[tuple[str, str | None]]:
    """(prompt, AdvBench target or None): AdvBench train-split goals first, then safety-tuned-llamas."""
    advbench = rd.harmful_ft_pairs(evals, min(n, 117), seed) if n else []
    extra = rd.safety_prompts(data, evals, n - len(advbench), seed) if n > len(advbench) else []
    return [(g, t) for g, t in advbench] + [(p, None) for p in extra]


def build_safety_pairs(cfg: PairsConfig, data_dir: Path, log: Callable[[str], None] = lambda m: None) -> Path:
    """Write `cfg.out` (JSONL pairs) and `<out>.manifest.json` (counts, sources, settings)."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite or another --out.")
    evals = rd.read_eval_sets(data_dir)
    loaded = load_model(cfg.model)
    harmful = _harmful_prompts(data_dir, evals, cfg.n_harmful, cfg.seed)
    benign = rd.harmless_prompts(data_dir, evals, 2 * cfg.n_benign, cfg.seed) if cfg.n_benign else []
    log(f"[pairs] generating {len(harmful) + len(benign)} greedy replies ({cfg.max_new_tokens} tokens)")
    replies = greedy(loaded, [p for p, _ in harmful] + benign, cfg.max_new_tokens, cfg.batch_size)
    rows: list[dict[str, Any]] = []
    for (prompt, target), reply in zip(harmful, replies):
        own = bool(reply) and not rd.is_refusal(reply)
        if not own and not target:
            continue
        rows.append({"prompt": prompt, "chosen": rd.refusal_for(prompt), "rejected": reply if own else target,
                     "kind": "harmful", "source": "model" if own else "advbench-target"})
    helpful = [(p, a) for p, a in zip(benign, replies[len(harmful):]) if a and not rd.is_refusal(a)]
    if len(helpful) < cfg.n_benign:
        raise DataError(f"Only {len(helpful)} usable benign answers for n_benign={cfg.n_benign}; lower n_benign.")
    rows += [{"prompt": p, "chosen": a, "rejected": rd.refusal_for(p), "kind": "benign", "source": "model"}
             for p, a in helpful[: cfg.n_benign]]
    random.Random(cfg.seed).shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    write_json(out.with_suffix(".manifest.json"), {
        "rows": len(rows), "harmful": sum(r["kind"] == "harmful" for r in rows), "benign": sum(r["kind"] == "benign" for r in rows),
        "rejected_from_target": sum(r["source"] == "advbench-target" for r in rows),
        "model": loaded.info.as_meta(), "config": {k: v for k, v in vars(cfg).items() if k != "overwrite"},
    })
    return out


def sae_texts(data: Sequence[str], pairs: Sequence[str], seed: int,
              data_dir: str | os.PathLike[str] | None) -> list[tuple[str, str]]:
    """(prompt, response) texts to train an SAE on: `NAME_OR_FILE[:count]` sets or files (a count
    samples that many rows) and preference pairs files (the chosen and the rejected response both);
    `DEFAULT_SAE_DATA` when neither is given. Named sets need the shared `data_dir`."""
    out: list[tuple[str, str]] = []
    rng = random.Random(seed)
    for text in data or (DEFAULT_SAE_DATA if not pairs else ()):
        spec = parse_data_spec(text)
        rows = [(p.prompt, p.response) for p in load_spec(spec, data_dir)]
        n = spec.weight if isinstance(spec.weight, int) else round(spec.weight * len(rows))
        out += rng.sample(rows, n) if n < len(rows) else rows
    for path in pairs:
        out += [(p.prompt, side) for p in read_preference_pairs(path) for side in (p.chosen, p.rejected)]
    if not out:
        raise DataError("No texts for the SAE; pass --data NAME_OR_FILE or --pairs FILE.")
    return out
