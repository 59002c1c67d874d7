"""Agreement between two judges' binary labels (judges.md (e)).

Labels are booleans per item (e.g. attack success: keyword "not refused" vs LLM score >= 4;
or over-refusal: keyword refused vs LLM full/partial refusal); None marks an item a judge could
not label (empty, unparsed), which is left out and counted. Reported: the 2x2 table, raw
agreement p_o, Cohen's kappa = (p_o - p_e) / (1 - p_e) with p_e = sum_c p_c^A p_c^B (NaN when
p_e = 1), PABAK = 2 p_o - 1, percentile bootstrap 95% CIs (fixed seed), the exact McNemar test
on the discordant counts, and up to five example ids per disagreement cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentguard.errors import ConfigError, DataError

__all__ = ["Agreement", "agreement", "cohen_kappa", "mcnemar_exact", "pabak"]

_MAX_EXAMPLES = 5


def cohen_kappa(n11: float, n10: float, n01: float, n00: float) -> float:
    """Cohen's kappa from a 2x2 table (A-positive/B-positive first); NaN when p_e = 1."""
    n = n11 + n10 + n01 + n00
    p_o = (n11 + n00) / n
    pa, pb = (n11 + n10) / n, (n11 + n01) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return float("nan") if math.isclose(p_e, 1.0) else (p_o - p_e) / (1 - p_e)


def pabak(n11: float, n10: float, n01: float, n00: float) -> float:
    """Prevalence- and bias-adjusted kappa, 2 p_o - 1."""
    return 2 * (n11 + n00) / (n11 + n10 + n01 + n00) - 1


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b vs c discordant pairs at 1/2."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


@dataclass(frozen=True)
class Agreement:
    """Agreement of judges `names[0]` (A) and `names[1]` (B) on one set; `table[a][b]` counts
    items with A-label `a` and B-label `b`, index 1 = positive."""

    names: tuple[str, str]
    positive: str
    n: int
    n_excluded: int
    table: tuple[tuple[int, int], tuple[int, int]]
    rate_a: float
    rate_b: float
    p_o: float
    kappa: float
    pabak: float
    ci: dict[str, tuple[float, float]]
    mcnemar_p: float
    higher: str | None
    examples: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: NaN becomes None."""

        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return None if math.isnan(v) else v
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return {k: clean(v) for k, v in self.__dict__.items()}


def _bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict[str, tuple[float, float]]:
    """Percentile 95% CIs of p_o, kappa and PABAK over `n_boot` item resamples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    ra, rb = a[idx], b[idx]
    n11 = (ra & rb).sum(1).astype(float)
    n10 = (ra & ~rb).sum(1).astype(float)
    n01 = (~ra & rb).sum(1).astype(float)
    n00 = (~ra & ~rb).sum(1).astype(float)
    stats = {
        "p_o": (n11 + n00) / len(a),
        "kappa": np.array([cohen_kappa(*t) for t in zip(n11, n10, n01, n00, strict=True)]),
        "pabak": 2 * (n11 + n00) / len(a) - 1,
    }
    out = {}
    for k, v in stats.items():
        v = v[~np.isnan(v)]
        out[k] = (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if len(v) else (math.nan, math.nan)
    return out


def agreement(
    labels_a: Sequence[bool | None],
    labels_b: Sequence[bool | None],
    ids: Sequence[str] | None = None,
    names: tuple[str, str] = ("keyword", "llm"),
    positive: str = "attack_success",
    n_boot: int = 2000,
    seed: int = 0,
) -> Agreement:
    """Agreement statistics of two judges' boolean labels on the same items.

    `higher` names the judge with more positives (with attack-success labels: the judge that
    reports the higher ASR), None on a tie.
    """
    if len(labels_a) != len(labels_b) or (ids is not None and len(ids) != len(labels_a)):
        raise DataError(f"Label lists differ in length ({len(labels_a)}, {len(labels_b)}, ids "
                        f"{len(ids) if ids is not None else '-'}); pass one label per item from each judge.")
    if n_boot < 1:
        raise ConfigError(f"n_boot={n_boot}; use >= 1 (2000 is the spec's default).")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(labels_a))]
    keep = [i for i in range(len(labels_a)) if labels_a[i] is not None and labels_b[i] is not None]
    if not keep:
        raise DataError(f"No item has labels from both {names[0]} and {names[1]}; check for empty or unparsed verdicts.")
    a = np.array([bool(labels_a[i]) for i in keep])
    b = np.array([bool(labels_b[i]) for i in keep])
    cells = {"11": a & b, "10": a & ~b, "01": ~a & b, "00": ~a & ~b}
    n11, n10, n01, n00 = (int(m.sum()) for m in cells.values())
    examples = {
        f"{names[0]}_only": [ids[keep[i]] for i in np.flatnonzero(cells["10"])[:_MAX_EXAMPLES]],
        f"{names[1]}_only": [ids[keep[i]] for i in np.flatnonzero(cells["01"])[:_MAX_EXAMPLES]],
    }
    return Agreement(
        names=names, positive=positive, n=len(keep), n_excluded=len(labels_a) - len(keep),
        table=((n00, n01), (n10, n11)), rate_a=(n11 + n10) / len(keep), rate_b=(n11 + n01) / len(keep),
        p_o=(n11 + n00) / len(keep), kappa=cohen_kappa(n11, n10, n01, n00), pabak=pabak(n11, n10, n01, n00),
        ci=_bootstrap(a, b, n_boot, seed), mcnemar_p=mcnemar_exact(n10, n01),
        higher=names[0] if n10 > n01 else names[1] if n01 > n10 else None, examples=examples,
    )
