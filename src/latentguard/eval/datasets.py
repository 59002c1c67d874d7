"""Prompt data: the shared data folder, user files (CSV / JSON / JSONL) and named datasets.

The shared folder is `$LATENTGUARD_SHARED_DATA`, else `<repo root>/../shared/data`, where the
repo root is the nearest parent of this file (or of the working directory) holding
`pyproject.toml`. Data are read in place, never copied into the repo.

Named sets live in `DATASETS`; each has a suite role (harmful / overrefusal / utility) and
yields `Record`s whose `source` is the set's name and `id` the id within the source file.
`advbench-heldout` is AdvBench minus every goal of the refusal-direction train and val splits
(normalised-text match: 117 train goals, 0 val goals, so 403 remain); use it whenever a
direction was extracted from those splits. See docs/eval.md.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentguard.errors import ConfigError, DataError
from latentguard.registry import Registry

__all__ = [
    "DATASETS",
    "ROLES",
    "SUITE_DEFAULTS",
    "Dataset",
    "Record",
    "dedupe_against",
    "normalize_text",
    "read_prompts",
    "read_records",
    "resolve_dataset",
    "sample",
    "select_datasets",
    "shared_data_dir",
    "user_dataset",
]

ROLES = ("harmful", "overrefusal", "utility")

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


def portable_path(path: str | os.PathLike[str]) -> str:
    """A path as it goes into metadata and reports, without this machine's layout: `<shared>/REL` under
    the shared data folder, REL under the repository, `latentguard/REL` inside the installed package;
    any other path (a user's own file) as given."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    p = p.resolve()
    roots: list[tuple[Path, str]] = []
    with contextlib.suppress(DataError):
        roots.append((shared_data_dir().resolve(), "<shared>/"))
    repo = _repo_root()
    if repo is not None:
        roots.append((repo.resolve(), ""))
    roots.append((Path(__file__).resolve().parents[1], "latentguard/"))
    for root, prefix in roots:
        if p.is_relative_to(root):
            return prefix + p.relative_to(root).as_posix()
    return str(path)


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


_READERS: dict[str, Callable[[Path], list[tuple[int, Any]]]] = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv}


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist; pass an existing CSV, JSON or JSONL file.")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown format {path.suffix!r}; use .csv, .json or .jsonl.")
    rows = reader(path)
    if not rows:
        raise DataError(f"{path} holds no records; pass a file with at least one prompt.")
    return rows


def _to_records(
    label: str,
    rows: list[tuple[int, Any]],
    prompt: str | None,
    source: str,
    ids: str | None = None,
    category: str | None = None,
    extra: dict[str, str] | None = None,
    id_prefix: str = "",
) -> list[Record]:
    """Rows -> Records; `extra` maps a Record.extra key to its column."""
    out = []
    for line, row in rows:
        get = row.get if isinstance(row, dict) else (lambda _k: None)
        text = row if prompt is None else get(prompt)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{label} line {line}: empty or missing {prompt or 'prompt'}; fill it or drop the line.")
        rid = get(ids) if ids else None
        cat = get(category) if category else None
        out.append(Record(
            prompt=text,
            id=str(rid) if rid is not None else f"{id_prefix}{line}",
            source=source,
            category=str(cat) if cat else None,
            extra={k: get(c) for k, c in (extra or {}).items()},
        ))
    return out


def read_records(path: str | os.PathLike[str], column: str | None = None, category_column: str | None = "category") -> list[Record]:
    """Read prompts from a CSV, JSON or JSONL file; errors name the file, line and fix."""
    path = Path(path)
    rows = _read_rows(path)
    col = _pick_column(path, rows, column)
    return _to_records(str(path), rows, col, source=str(path), category=category_column, id_prefix=f"{path.stem}:")


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


# ---------------------------------------------------------------- named datasets and suites


@dataclass(frozen=True)
class Dataset:
    """A named prompt set, its suite role and how to read it (`reader` returns every record)."""

    name: str
    role: str
    description: str
    reader: Callable[[], list[Record]] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"Dataset {self.name!r} has role {self.role!r}; use one of {', '.join(ROLES)}.")

    def load(self, limit: int | None = None, seed: int = 0) -> list[Record]:
        """All records, or a seeded sample of `limit` of them."""
        records = self.reader()
        if not records:
            raise DataError(f"Dataset {self.name!r} holds no records; check its file or column mapping.")
        return sample(records, limit, seed)


DATASETS: Registry[Dataset] = Registry("dataset")
# The data sets a suite evaluates when --datasets is not given.
SUITE_DEFAULTS: dict[str, tuple[str, ...]] = {
    "harmful": ("advbench-heldout",),
    "overrefusal": ("xstest-safe",),
    "utility": ("gsm8k-test",),
}


def _add(name: str, role: str, description: str, reader: Callable[[], list[Record]]) -> None:
    DATASETS.register(name)(Dataset(name, role, description, reader))


def _rows_stl(path: Path) -> list[tuple[int, Any]]:
    """safety-tuned-llamas evaluation files: {"instructions": [...], "tags": [...]?, "inputs": []}."""
    data = json.loads(path.read_text(encoding="utf-8"))
    tags = data.get("tags") or [None] * len(data["instructions"])
    return [(i, {"instruction": x, "tag": t}) for i, (x, t) in enumerate(zip(data["instructions"], tags))]


def _read_shared(
    name: str,
    rel: str,
    prompt: str,
    ids: str | None = None,
    category: str | None = None,
    extra: dict[str, str] | None = None,
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> list[Record]:
    """Read a file of the shared data folder; records without an id column get their 0-based row."""
    path = shared_data_dir() / rel
    if not path.is_file():
        raise DataError(f"{path} is missing from the shared data folder; restore it or set LATENTGUARD_SHARED_DATA.")
    rows = _rows_stl(path) if rel.startswith("safety_tuned_llamas/") else _read_rows(path)
    rows = [(i, r) for i, (_, r) in enumerate(rows)]
    rows = [(i, r) for i, r in rows if keep is None or keep(r)]
    return _to_records(str(path), rows, prompt, source=name, ids=ids, category=category, extra=extra)


def _advbench_heldout() -> list[Record]:
    """AdvBench goals minus the refusal-direction train/val splits (the held-out split)."""
    used = [
        r.prompt
        for split in ("train", "val")
        for r in _read_shared("rd", f"refusal_direction_splits/harmful_{split}.json", "instruction")
    ]
    kept = dedupe_against(DATASETS.get("advbench").reader(), used)
    return [dataclasses.replace(r, source="advbench-heldout") for r in kept]  # ids stay AdvBench rows


def _has_label(row: dict[str, Any], label: str) -> bool:
    return bool(row["label"] == label)


def _register_builtin() -> None:
    _add("advbench", "harmful", "AdvBench harmful_behaviors.csv goals (520)",
         functools.partial(_read_shared, "advbench", "advbench/harmful_behaviors.csv", "goal", extra={"target": "target"}))
    _add("advbench-heldout", "harmful", "AdvBench minus the refusal-direction train/val goals (403)", _advbench_heldout)
    for split, n in (("val", 41), ("test", 159)):
        _add(f"harmbench-{split}", "harmful", f"HarmBench {split}, standard functional category ({n})",
             functools.partial(_read_shared, f"harmbench-{split}", f"harmbench/harmbench_behaviors_text_{split}.csv",
                               "Behavior", ids="BehaviorID", category="SemanticCategory",
                               keep=lambda r: r["FunctionalCategory"] == "standard"))
    for label, role, n in (("safe", "overrefusal", 250), ("unsafe", "harmful", 200)):
        _add(f"xstest-{label}", role, f"XSTest {label} prompts ({n}); category = type",
             functools.partial(_read_shared, f"xstest-{label}", "xstest/xstest_prompts.csv", "prompt", ids="id",
                               category="type", extra={"focus": "focus", "note": "note"},
                               keep=functools.partial(_has_label, label=label)))
    for split in ("test", "train"):
        _add(f"gsm8k-{split}", "utility", f"GSM8K {split} questions; extra.answer is the reference",
             functools.partial(_read_shared, f"gsm8k-{split}", f"gsm8k/{split}.jsonl", "question", extra={"answer": "answer"}))
    for stem, role in (("I-MaliciousInstructions", "harmful"), ("Q-Harm", "harmful"), ("I-CoNa", "harmful"),
                       ("I-Controversial", "harmful"), ("I-Alpaca", "overrefusal")):
        name = stem.lower()
        _add(name, role, f"safety-tuned-llamas evaluation/{stem}.json",
             functools.partial(_read_shared, name, f"safety_tuned_llamas/evaluation/{stem}.json", "instruction", category="tag"))
    for kind, role in (("harmful", "harmful"), ("harmless", "overrefusal")):
        for split in ("train", "val", "test"):
            _add(f"rd-{kind}-{split}", role, f"refusal-direction splits {kind}_{split}.json",
                 functools.partial(_read_shared, f"rd-{kind}-{split}", f"refusal_direction_splits/{kind}_{split}.json",
                                   "instruction", category="category"))


_register_builtin()

# User data: PATH[:COLUMN] or PATH:key=value,... with these keys.
_MAPPING_KEYS = ("prompt", "id", "category", "answer", "split", "role")


def _parse_user_spec(spec: str) -> tuple[Path, dict[str, str]]:
    if Path(spec).exists():
        return Path(spec), {}
    head, sep, rest = spec.rpartition(":")
    if not sep or not head:
        return Path(spec), {}
    if "=" not in rest:
        return Path(head), {"prompt": rest}
    mapping: dict[str, str] = {}
    for kv in rest.split(","):
        k, eq, v = kv.partition("=")
        if not eq or k not in _MAPPING_KEYS or not v:
            raise ConfigError(f"Bad column mapping {kv!r} in {spec!r}; write key=value with key in {', '.join(_MAPPING_KEYS)}.")
        mapping[k] = v
    return Path(head), mapping


def _check_columns(label: str, first: Any, mapping: dict[str, str]) -> None:
    for key in ("prompt", "id", "category", "answer"):
        col = mapping.get(key)
        if col and (not isinstance(first, dict) or col not in first):
            cols = ", ".join(map(str, first)) if isinstance(first, dict) else "(plain strings)"
            raise DataError(f"{label} has no column {col!r} (for {key}); columns: {cols}.")


def _hf_rows(path: Path, split: str | None) -> list[tuple[int, Any]]:
    from datasets import DatasetDict, load_from_disk  # heavy import (pyarrow), only for HF data

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path} is not a dataset saved with `save_to_disk`; pass such a folder or a CSV/JSON/JSONL file.") from e
    if isinstance(ds, DatasetDict):
        names = list(ds)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in ds:
            raise DataError(f"{path} holds splits {', '.join(names)}; pick one with split=NAME.")
        ds = ds[split]
    return [(i, row) for i, row in enumerate(ds)]


def _read_user(name: str, path: Path, mapping: dict[str, str]) -> list[Record]:
    rows = _hf_rows(path, mapping.get("split")) if path.is_dir() else _read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no records; pass data with at least one prompt.")
    _check_columns(str(path), rows[0][1], mapping)
    prompt = _pick_column(path, rows, mapping.get("prompt"))
    first = rows[0][1]
    category = mapping.get("category") or ("category" if isinstance(first, dict) and "category" in first else None)
    extra = {"answer": mapping["answer"]} if "answer" in mapping else None
    return _to_records(str(path), rows, prompt, source=name, ids=mapping.get("id"), category=category,
                       extra=extra, id_prefix="" if path.is_dir() else f"{path.stem}:")


def user_dataset(spec: str) -> Dataset:
    """A Dataset from `PATH[:COLUMN]` or `PATH:prompt=C,id=C,category=C,answer=C,split=S,role=R`.

    PATH is a CSV/JSON/JSONL file or a folder written by `datasets.Dataset.save_to_disk`;
    the role defaults to harmful.
    """
    path, mapping = _parse_user_spec(spec)
    if not path.exists():
        raise DataError(
            f"Dataset {spec!r} is neither a known name nor an existing path; pass one of "
            f"{', '.join(DATASETS.names())}, or PATH[:COLUMN] of a CSV/JSON/JSONL file or saved HF dataset."
        )
    role = mapping.pop("role", "harmful")
    return Dataset(spec, role, f"user data {path}", functools.partial(_read_user, spec, path, mapping))


def resolve_dataset(spec: str) -> Dataset:
    """A registered name (case-insensitive) or a user path spec."""
    if spec in DATASETS:
        return DATASETS.get(spec)
    if spec.lower() in DATASETS:
        return DATASETS.get(spec.lower())
    if "/" in spec or ":" in spec or Path(spec).suffix.lower() in _READERS or Path(spec).exists():
        return user_dataset(spec)
    return DATASETS.get(spec)  # raises, naming close matches and every known set


def _split_specs(text: str) -> list[str]:
    """Split a comma list of dataset specs, keeping `key=value` mapping parts with their spec."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if specs and part.partition("=")[0] in _MAPPING_KEYS and "=" in part:
            specs[-1] += "," + part
        elif part:
            specs.append(part)
    return specs


def select_datasets(suite: str | None, datasets: str | None) -> list[Dataset]:
    """Data sets to evaluate: `datasets` (comma list) if given, else the defaults of each suite.

    With both, every data set's role must be one of the suites.
    """
    suites = [s.strip() for s in suite.split(",") if s.strip()] if suite else None
    for s in suites or ():
        if s not in ROLES:
            raise ConfigError(f"Unknown suite {s!r}; use a comma list of {', '.join(ROLES)}.")
    if datasets:
        chosen = [resolve_dataset(d) for d in _split_specs(datasets)]
        for d in chosen:
            if suites and d.role not in suites:
                raise ConfigError(f"Dataset {d.name!r} has role {d.role!r}, not in --suite {suite}; add it to --suite or drop the data set.")
    else:
        chosen = [DATASETS.get(n) for s in (suites or ROLES) for n in SUITE_DEFAULTS[s]]
    if not chosen:
        raise ConfigError("No data sets selected; pass --suite or --datasets.")
    return list({d.name: d for d in chosen}.values())
