"""MoGU training data from the shared folder (mogu.md §1.2, §6), one JSONL row per example.

- X_m (malicious): safety-tuned-llamas instructions whose reference output's first sentence is a
  refusal; that sentence is Y_r. Y_g is the base model's own greedy first sentence (the unaligned
  embedded model complies readily); rows whose answer is a refusal are dropped.
- X_b (benign): refusal-direction `harmless_train` instructions; Y_g is the base model's greedy
  first sentence, Y_r one of 8 refusal templates (the first 8 of `reference_data.REFUSALS`) by hash.
- X_b also takes `n_borderline` of the project's harmful-sounding benign prompts (`borderline.py`,
  the train share, XSTest near-duplicates dropped) with the base model's answers, in the router data
  only (label 0): a project extension, not in the paper. Routers trained on plain Alpaca-style X_b lean
  Unwill on XSTest's safe prompts ("kill a Python process"); 0 gives the spec's data exactly.
- Files: `glad.jsonl` (X_m -> Y_g, contrast Y_r), `unwill.jsonl` (X_b -> Y_r, contrast Y_g),
  `router.jsonl` ((X_b, Y_g, label 0) ∪ (X_m, Y_r, label 1), shuffled; the label sits in each row),
  `val.json` (harmful_val minus AdvBench/HarmBench, harmless_val: checkpoint selection only).
Every prompt is de-duplicated against every evaluation set (`EvalSets.fresh`); targets are first
sentences cut to `response_tokens` tokens, with no EOS (the trainer masks the template's end).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentguard.artifacts import sha256_of_texts, write_json
from latentguard.errors import ConfigError, DataError
from latentguard.models import LoadedModel
from latentguard.training import reference_data as rd
from latentguard.training.reference import greedy

__all__ = ["MoGUDataConfig", "build_mogu_data", "first_sentence", "read_jsonl", "write_mogu_data"]

FILES = ("glad.jsonl", "unwill.jsonl", "router.jsonl")
N_TEMPLATES = 8  # refusal templates for benign prompts (the first 8 of reference_data.REFUSALS)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


@dataclass
class MoGUDataConfig:
    n_harmful: int = field(default=64, metadata={"help": "malicious instructions (X_m)"})
    n_benign: int = field(default=64, metadata={"help": "benign instructions (X_b)"})
    answer_tokens: int = field(default=32, metadata={"help": "greedy tokens of the base model's answers"})
    response_tokens: int = field(default=24, metadata={"help": "targets and contrasts cut to this many tokens"})
    n_val: int = field(default=24, metadata={"help": "validation prompts per side (checkpoint selection)"})
    n_borderline: int = field(default=0, metadata={"help": "harmful-sounding benign prompts added to the router's X_b"})
    seed: int = field(default=42, metadata={"help": "sampling seed"})

    def __post_init__(self) -> None:
        if min(self.n_harmful, self.n_benign, self.n_val) < 2:
            raise ConfigError("MoGU data needs n_harmful, n_benign and n_val >= 2.")
        if self.n_borderline < 0:
            raise ConfigError(f"n_borderline={self.n_borderline}; use 0 (spec data) or more borderline router rows.")
        if min(self.answer_tokens, self.response_tokens) < 4:
            raise ConfigError("answer_tokens and response_tokens must be >= 4.")


def first_sentence(text: str, min_words: int = 3) -> str:
    """Up to the first sentence end (., !, ? then a space, or a line break) after at least `min_words`
    words, so a list's "1." does not count; the whole text if there is none."""
    text = text.strip()
    for m in _SENTENCE_END.finditer(text):
        if len(text[: m.start()].split()) >= min_words:
            return text[: m.start()].strip()
    return text


def _cut(tok: Any, text: str, n: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tok.decode(ids[:n]).rstrip()


def _template_refusal(prompt: str) -> str:
    """One of 8 fixed refusal templates (mogu.md §6), picked by a stable hash of the prompt."""
    return rd.REFUSALS[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % N_TEMPLATES]


def _harmful_pool(data: Path, evals: rd.EvalSets) -> dict[str, str]:
    """Fresh safety-tuned-llamas instruction -> the first sentence of its reference output, kept if a refusal."""
    rows = json.loads((data / "safety_tuned_llamas/safety_only_data_Instructions.json").read_text())
    refusals = {r["instruction"]: first_sentence(r["output"]) for r in rows if not r.get("input")}
    return {p: refusals[p] for p in evals.fresh(refusals) if rd.is_refusal(refusals[p])}


def _validation(data: Path, evals: rd.EvalSets, n: int, seed: int) -> dict[str, list[str]]:
    split = data / "refusal_direction_splits"
    test_sets = {rd.normalize(r["goal"]) for r in evals.advbench}
    harmful = [r["instruction"] for r in json.loads((split / "harmful_val.json").read_text())
               if rd.normalize(r["instruction"]) not in test_sets]
    benign = [r["instruction"] for r in json.loads((split / "harmless_val.json").read_text())]
    rng = random.Random(seed)
    return {"harmful": rng.sample(harmful, min(n, len(harmful))), "benign": rng.sample(benign, n)}


def build_mogu_data(loaded: LoadedModel, data: Path, cfg: MoGUDataConfig,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """The three training files' rows, the validation prompts and a manifest (counts, drops, hashes)."""
    evals = rd.read_eval_sets(data)
    rng = random.Random(cfg.seed)
    pool = _harmful_pool(data, evals)
    spare = 1.3  # the base model refuses a few; ask for more and drop those
    n_m, n_b = min(len(pool), int(cfg.n_harmful * spare) + 4), int(cfg.n_benign * spare) + 4
    if len(pool) < cfg.n_harmful:
        raise DataError(f"Only {len(pool)} fresh refusing safety-tuned-llamas rows; lower n_harmful.")
    x_m = rng.sample(sorted(pool), n_m)
    x_b = rd.harmless_prompts(data, evals, n_b, cfg.seed)
    x_bl: list[str] = []
    if cfg.n_borderline:
        train_bl, _ = rd.borderline_split(evals, rd.N_BORDERLINE_VAL, cfg.seed)
        x_bl = rng.sample(train_bl, min(len(train_bl), int(cfg.n_borderline * spare) + 4))
    log(f"[mogu] base answers for {len(x_m)} harmful + {len(x_b)} benign + {len(x_bl)} borderline prompts "
        f"({cfg.answer_tokens} tokens)")
    answers = greedy(loaded, x_m + x_b + x_bl, cfg.answer_tokens)
    tok = loaded.tokenizer
    y_g = {p: _cut(tok, first_sentence(a), cfg.response_tokens) for p, a in zip(x_m + x_b + x_bl, answers)}
    ok = {p for p, a in y_g.items() if a and not rd.is_refusal(a)}
    harmful = [p for p in x_m if p in ok][: cfg.n_harmful]
    benign = [p for p in x_b if p in ok][: cfg.n_benign]
    borderline = [p for p in x_bl if p in ok][: cfg.n_borderline]
    if len(borderline) < cfg.n_borderline:
        raise DataError(f"The base model answered only {len(borderline)} borderline prompts without refusing; "
                        f"lower n_borderline (asked {cfg.n_borderline}).")
    if len(harmful) < cfg.n_harmful or len(benign) < cfg.n_benign:
        raise DataError(f"The base model complied on only {len(harmful)} harmful / {len(benign)} benign prompts; "
                        "lower n_harmful / n_benign or use a less aligned base (MoGU's Glad data is its compliance).")
    y_r = {**{p: _cut(tok, pool[p], cfg.response_tokens) for p in harmful},
           **{p: _cut(tok, first_sentence(_template_refusal(p)), cfg.response_tokens) for p in benign}}
    glad = [{"prompt": p, "response": y_g[p], "contrast": y_r[p], "label": 1} for p in harmful]
    unwill = [{"prompt": p, "response": y_r[p], "contrast": y_g[p], "label": 0} for p in benign]
    router = [{"prompt": p, "response": y_g[p], "label": 0} for p in benign + borderline] + \
             [{"prompt": p, "response": y_r[p], "label": 1} for p in harmful]
    rng.shuffle(router)
    manifest = {
        "config": cfg.__dict__, "n_harmful_pool": len(pool),
        "dropped_refusing_answers": {"harmful": len(x_m) - sum(p in ok for p in x_m), "benign": len(x_b) - sum(p in ok for p in x_b),
                                     "borderline": len(x_bl) - sum(p in ok for p in x_bl)},
        "rows": {"glad": len(glad), "unwill": len(unwill), "router": len(router), "router_borderline": len(borderline)},
        "sources": {"harmful": "safety_tuned_llamas/safety_only_data_Instructions.json (refusing first sentence = Y_r)",
                    "benign": "refusal_direction_splits/harmless_train.json", "glad_answers": f"greedy, {loaded.info.model_id}",
                    "borderline": "latentguard.training.borderline (train share; XSTest near-duplicates dropped)"},
        "sha256": {"harmful": sha256_of_texts(harmful), "benign": sha256_of_texts(benign),
                   **({"borderline": sha256_of_texts(borderline)} if borderline else {})},
    }
    return {"glad": glad, "unwill": unwill, "router": router,
            "val": _validation(data, evals, cfg.n_val, cfg.seed), "manifest": manifest}


def write_mogu_data(out: Path, built: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in built[name.split(".")[0]]))
    write_json(out / "val.json", built["val"])
    write_json(out / "manifest.json", built["manifest"])  # written last: marks the stage done


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} does not exist; build the MoGU data first (latentguard train --method mogu).")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
