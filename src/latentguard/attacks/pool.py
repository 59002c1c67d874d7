"""Benign instruction pools for RADIAL and the distractor template, and the text-manipulation filter.

Default pool (radial.md §3 project substitute): the Alpaca instructions of
`refusal_direction_splits/harmless_*` minus every prompt of any evaluation set (normalised text;
`training.reference_data.EvalSets`), so val/test drop out and `harmless_train` remains.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from latentguard.artifacts import sha256_of_texts
from latentguard.errors import ConfigError, DataError
from latentguard.eval.datasets import portable_path

__all__ = ["DEFAULT_FILTER", "Pool", "filter_instructions", "load_pool"]

# radial.md §3, reconstructed rule (case-insensitive): instructions that make the model translate
# or rewrite the list's harmful item instead of executing it.
DEFAULT_FILTER = (
    r"translat|rewrite|rephras|paraphras|edit |proofread|summari[sz]e|convert|change the following|"
    r"the following|given (text|sentence|passage|paragraph)|this (sentence|text|paragraph)|correct the"
)


@dataclass
class Pool:
    """Instructions kept after the filter, with their provenance."""

    instructions: list[str]
    source: str
    n_read: int
    n_dropped: int
    dropped_examples: list[str]
    sha256: str

    def as_meta(self) -> dict[str, object]:
        return {"source": self.source, "n_read": self.n_read, "n_dropped": self.n_dropped, "n": len(self.instructions),
                "dropped_examples": self.dropped_examples, "sha256": self.sha256}


def filter_instructions(instructions: Sequence[str], pattern: str) -> tuple[list[str], list[str]]:
    """(kept, dropped) under the case-insensitive regex `pattern` ('' keeps everything)."""
    if not pattern:
        return list(instructions), []
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ConfigError(f"filter={pattern!r} is not a valid regular expression ({e}); fix it or pass filter=''.") from e
    kept = [s for s in instructions if not rx.search(s)]
    return kept, [s for s in instructions if rx.search(s)]


def _default_instructions(data_dir: Path | None) -> tuple[list[str], str]:
    if data_dir is None:
        raise DataError("No shared data folder for the default instruction pool; set LATENTGUARD_SHARED_DATA or pass pool=FILE.")
    from latentguard.training.reference_data import (
        read_eval_sets,  # training pulls in trl: import on use
    )

    evals = read_eval_sets(data_dir)
    rd = data_dir / "refusal_direction_splits"
    raw = [r["instruction"] for split in ("train", "val", "test")
           for r in json.loads((rd / f"harmless_{split}.json").read_text(encoding="utf-8"))]
    return evals.fresh(raw), f"{portable_path(rd)}/harmless_{{train,val,test}}.json minus every eval set"


def load_pool(
    spec: str | None,
    size: int,
    seed: int,
    pattern: str,
    data_dir: Path | None,
    read_prompts: Callable[[str], list[str]] | None,
) -> Pool:
    """Read, de-duplicate, filter and sample (seeded; `size` 0 = all) the benign instruction pool."""
    if spec:
        if read_prompts is None:
            raise ConfigError("This caller cannot read pool files; pass the instructions directly.")
        raw, source = read_prompts(spec), spec
    else:
        raw, source = _default_instructions(data_dir)
    raw = [" ".join(s.split()) for s in raw if s and s.strip()]  # one item per line in a list
    raw = list(dict.fromkeys(raw))
    kept, dropped = filter_instructions(raw, pattern)
    if not kept:
        why = f" ({len(dropped)} dropped by the text-manipulation filter)" if dropped else ""
        raise DataError(f"The instruction pool {source!r} is empty{why}; pass a pool with benign instructions "
                        "(pool=FILE, one instruction per row) or relax filter=.")
    if size and size < len(kept):
        kept = random.Random(seed).sample(kept, size)
    return Pool(kept, source, len(raw), len(dropped), dropped[:10], sha256_of_texts(kept))
