"""Prompt data: the shared data folder, user files (CSV / JSON / JSONL) and named datasets.

The shared folder is `$LATENTGUARD_SHARED_DATA`, else `<repo root>/../shared/data`, where the
repo root is the nearest parent of this file (or of the working directory) holding
`pyproject.toml`. Data are read in place, never copied into the repo.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentguard.errors import DataError

__all__ = [
    "Record",
    "shared_data_dir",
    "read_records",
    "read_prompts",
    "sample",
    "normalize_text",
    "dedupe_against",
]

PROMPT_COLUMNS = ("prompt", "instruction", "goal", "Behavior", "question", "text")


@dataclass
class Record:
    """One prompt with provenance: `source` file or dataset name, `id` unique within it."""

    prompt: str
    id: str
    source: str
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _repo_root() -> Path | None:
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for p in (start, *start.parents):
            if (p / "pyproject.toml").is_file() and (p / "src" / "latentguard").is_dir():
                return p
    return None


def shared_data_dir() -> Path:
    """The shared data folder, or a one-line error naming the env var that sets it."""
    env = os.environ.get("LATENTGUARD_SHARED_DATA")
    root = _repo_root()
    path = Path(env) if env else (root.parent / "shared" / "data" if root else Path("../shared/data"))
    if not path.is_dir():
        raise DataError(
            f"Shared data folder {path} not found; set LATENTGUARD_SHARED_DATA to the folder holding "
            "advbench/, xstest/, refusal_direction_splits/ ..."
        )
    return path


def _rows_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i} is not valid JSON ({e.msg}); fix or remove that line.") from e
            rows.append((i, obj))
    return rows


def _rows_json(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno} is not valid JSON ({e.msg}); fix the file.") from e
    if isinstance(data, dict):  # {"data": [...]} or similar single-list wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path} holds an object, not a list of records; pass a JSON list.")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of records or strings.")
    return [(i, r) for i, r in enumerate(data, 1)]


def _rows_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path} has no header row; add one naming the prompt column.")
        rows = []
        for row in reader:
            if None in row:
                raise DataError(f"{path} line {reader.line_num} has more fields than the header; quote fields with commas.")
            rows.append((reader.line_num, dict(row)))
        return rows


def _pick_column(path: Path, rows: list[tuple[int, Any]], column: str | None) -> str | None:
    first = rows[0][1]
    if isinstance(first, str):
        if column:
            raise DataError(f"{path} holds plain strings; drop --column {column}.")
        return None
    if not isinstance(first, dict):
        raise DataError(f"{path} item 1 is a {type(first).__name__}; use objects or strings.")
    if column:
        if column not in first:
            raise DataError(f"{path} has no column {column!r}; columns: {', '.join(map(str, first))}.")
        return column
    for c in PROMPT_COLUMNS:
        if c in first:
            return c
    raise DataError(f"{path}: no prompt column found among {', '.join(map(str, first))}; pass --column NAME.")


def read_records(path: str | os.PathLike[str], column: str | None = None, category_column: str | None = "category") -> list[Record]:
    """Read prompts from a CSV, JSON or JSONL file; errors name the file, line and fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist; pass an existing CSV, JSON or JSONL file.")
    readers = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown format {path.suffix!r}; use .csv, .json or .jsonl.")
    rows = reader(path)
    if not rows:
        raise DataError(f"{path} holds no records; pass a file with at least one prompt.")
    col = _pick_column(path, rows, column)
    out = []
    for line, row in rows:
        text = row if col is None else (row.get(col) if isinstance(row, dict) else None)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} line {line}: empty or missing {col or 'prompt'}; fill it or drop the line.")
        cat = row.get(category_column) if isinstance(row, dict) and category_column else None
        out.append(Record(prompt=text, id=f"{path.stem}:{line}", source=str(path), category=cat or None))
    return out


def read_prompts(path: str | os.PathLike[str], column: str | None = None) -> list[str]:
    return [r.prompt for r in read_records(path, column)]


def normalize_text(s: str) -> str:
    """Lower-case, alphanumerics only: the key used to de-duplicate across data sets."""
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def dedupe_against(records: Sequence[Record], *others: Sequence[str]) -> list[Record]:
    """Drop records whose normalised prompt occurs in any of `others` (or earlier in `records`)."""
    seen = {normalize_text(t) for o in others for t in o}
    out = []
    for r in records:
        key = normalize_text(r.prompt)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def sample(records: Sequence[Record], n: int | None, seed: int) -> list[Record]:
    """`random.Random(seed).sample` of n records (all, in order, when n is None or >= len)."""
    if n is None or n >= len(records):
        return list(records)
    if n < 1:
        raise DataError(f"n={n}; ask for at least 1 prompt.")
    return random.Random(seed).sample(list(records), n)
