"""Training data: instruction/response pairs from files or named sets, and `--data` specs.

Files are CSV, JSON (a list of objects) or JSONL with a prompt and a response column, mapped
with `prompt_column` / `response_column` or detected from common names. Named sets read the
shared data folder (its path is passed in; training does not import `eval`).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentguard.artifacts import sha256_of_texts
from latentguard.errors import ConfigError, DataError
from latentguard.registry import Registry

__all__ = [
    "TRAIN_SETS", "DataSpec", "NamedSet", "Pair", "load_spec", "pairs_hash", "parse_data_spec", "read_pairs", "read_prompts",
]

PROMPT_COLUMNS = ("prompt", "instruction", "question", "goal", "query")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion", "target", "chosen")


@dataclass(frozen=True)
class Pair:
    """One training example: a user prompt and the assistant response it is trained to give."""

    prompt: str
    response: str
    source: str


@dataclass(frozen=True)
class NamedSet:
    """A training set inside the shared data folder."""

    path: str
    prompt: str
    response: str
    description: str


TRAIN_SETS: Registry[NamedSet] = Registry("training set")
for _name, _set in {
    "gsm8k-train": NamedSet("gsm8k/train.jsonl", "question", "answer", "GSM8K train, question -> worked answer (7,473)"),
    "safety": NamedSet("safety_tuned_llamas/safety_only_data_Instructions.json", "instruction", "output",
                       "Bianchi et al. harmful instruction -> safe response (2,483)"),
    "advbench-targets": NamedSet("advbench/harmful_behaviors.csv", "goal", "target",
                                 "AdvBench goal -> affirmative 'Sure, here is' target (520; harmful fine-tuning)"),
}.items():
    TRAIN_SETS.register(_name)(_set)
_ALIASES = {"gsm8k": "gsm8k-train"}


@dataclass(frozen=True)
class DataSpec:
    """A parsed `--data NAME_OR_FILE[:weight]`: weight is a per-epoch fraction (float) or count (int)."""

    source: str
    weight: float | int = 1.0


def parse_data_spec(text: str) -> DataSpec:
    """`gsm8k:0.5` -> fraction 0.5 per epoch; `safety:100` -> 100 rows per epoch; `file.jsonl` -> all."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).exists():
        return DataSpec(text)
    try:
        weight: float | int = float(tail) if "." in tail or "e" in tail.lower() else int(tail)
    except ValueError:
        return DataSpec(text)
    if weight <= 0 or (isinstance(weight, int) and weight < 1):
        raise ConfigError(f"--data {text!r}: weight {tail} must be > 0 (a fraction like 0.5 or a count like 100).")
    return DataSpec(head, weight)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist; pass an existing CSV, JSON or JSONL file or a named set.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else []
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); fix the file.") from e
    raise DataError(f"{path}: unknown format {suffix!r}; use .csv, .json or .jsonl.")


def _column(path: Path, first: dict[str, Any], given: str | None, candidates: tuple[str, ...], what: str) -> str:
    if given:
        if given not in first:
            raise DataError(f"{path} has no {what} column {given!r}; columns: {', '.join(first)}.")
        return given
    for c in candidates:
        if c in first:
            return c
    raise DataError(
        f"{path} has no {what} column (looked for {', '.join(candidates)}; columns: {', '.join(first)}); "
        f"pass --{what}-column NAME."
    )


def read_pairs(
    path: str | os.PathLike[str], prompt_column: str | None = None, response_column: str | None = None,
    source: str | None = None,
) -> list[Pair]:
    """Read prompt/response pairs; an Alpaca-style non-empty `input` is appended to the prompt."""
    path = Path(path)
    rows = _rows(path)
    if not rows or not isinstance(rows[0], dict):
        raise DataError(f"{path} holds no records of prompt/response objects; pass a list of objects.")
    pcol = _column(path, rows[0], prompt_column, PROMPT_COLUMNS, "prompt")
    rcol = _column(path, rows[0], response_column, RESPONSE_COLUMNS, "response")
    pairs = []
    for i, row in enumerate(rows, 1):
        prompt, response = row.get(pcol), row.get(rcol)
        if not isinstance(prompt, str) or not isinstance(response, str) or not prompt.strip() or not response.strip():
            raise DataError(f"{path} record {i}: empty or missing {pcol!r}/{rcol!r}; fill it or drop the record.")
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip() and pcol != "input":
            prompt = f"{prompt}\n\n{extra}"
        pairs.append(Pair(prompt, response, source or str(path)))
    return pairs


def read_prompts(path: str | os.PathLike[str], prompt_column: str | None = None) -> list[str]:
    """Prompts only (direction contrast sets): a .txt file (one per line), or records with a prompt column."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"Prompt file {path} does not exist; pass an existing file.")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows: list[Any] = _rows(path)
    if rows and all(isinstance(r, str) for r in rows):
        return [str(r) for r in rows if str(r).strip()]
    if not rows or not isinstance(rows[0], dict):
        raise DataError(f"{path} holds no prompts; pass a list of strings or of objects with a prompt column.")
    col = _column(path, rows[0], prompt_column, PROMPT_COLUMNS, "prompt")
    return [str(r[col]) for r in rows if isinstance(r.get(col), str) and r[col].strip()]


def load_spec(
    spec: DataSpec, data_dir: str | os.PathLike[str] | None,
    prompt_column: str | None = None, response_column: str | None = None,
) -> list[Pair]:
    """The pairs of one `--data` source: a named set (needs `data_dir`) or a file."""
    name = _ALIASES.get(spec.source, spec.source)
    if name in TRAIN_SETS:
        if data_dir is None:
            raise DataError(f"Named set {name!r} needs the shared data folder; set LATENTGUARD_SHARED_DATA or pass data_dir.")
        named = TRAIN_SETS.get(name)
        return read_pairs(Path(data_dir) / named.path, named.prompt, named.response, source=name)
    if not Path(spec.source).exists() and "/" not in spec.source and "." not in spec.source:
        TRAIN_SETS.get(name)  # raises, naming close matches and every named set
    return read_pairs(spec.source, prompt_column, response_column)


def pairs_hash(pairs: list[Pair]) -> str:
    return sha256_of_texts([t for p in pairs for t in (p.prompt, p.response)])
