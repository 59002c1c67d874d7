"""Data mixing: per-epoch, seeded re-sampling of several sources with fractions or fixed counts.

Each epoch draws `n_i` rows from source i (a fraction of its rows, or a fixed count; without
replacement while it lasts, cycling through fresh permutations beyond its size), then shuffles
the union. The plan depends only on (seed, epoch), so every DDP rank and a resumed run see the
same order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from latentguard.errors import ConfigError

__all__ = ["MixtureSampler", "epoch_plan", "per_epoch_count"]


def per_epoch_count(weight: float, size: int) -> int:
    """Rows per epoch: an int weight is a count, a float weight a fraction of `size` (at least 1)."""
    if size < 1:
        raise ConfigError("A data source is empty after preparation; check its rows and --max-length.")
    return weight if isinstance(weight, int) else max(1, round(weight * size))


def _draw(members: Sequence[int], n: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        perm = list(members)
        rng.shuffle(perm)
        out.extend(perm[: n - len(out)])
    return out


def epoch_plan(groups: Sequence[Sequence[int]], counts: Sequence[int], seed: int, epoch: int) -> list[int]:
    """Dataset indices of one epoch: `counts[i]` draws from `groups[i]`, shuffled together."""
    rng = random.Random(f"latentguard-mix/{seed}/{epoch}")
    plan = [i for g, n in zip(groups, counts, strict=True) for i in _draw(g, n, rng)]
    rng.shuffle(plan)
    return plan


class MixtureSampler(Sampler[int]):
    """Sampler over a concatenated dataset; `set_epoch` (called by the Trainer) re-samples."""

    def __init__(self, groups: Sequence[Sequence[int]], counts: Sequence[int], seed: int) -> None:
        self.groups = [list(g) for g in groups]
        self.counts = list(counts)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_plan(self.groups, self.counts, self.seed, self.epoch))

    def __len__(self) -> int:
        return sum(self.counts)
