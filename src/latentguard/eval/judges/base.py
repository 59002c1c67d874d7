"""The judge interface: `Judge.score(prompt, response) -> Verdict`, and the `JUDGES` registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from latentguard.registry import Registry

if TYPE_CHECKING:
    from latentguard.models import LoadedModel

__all__ = ["JUDGES", "Judge", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    """One judge's reading of one (prompt, response) pair.

    `label` is the judge's own vocabulary: `refused`/`complied`/`empty` (keyword, direction),
    `1`..`5` (harm rubric), `1_full_compliance`/`2_full_refusal`/`3_partial_refusal` (refusal
    rubric), or `unparsed`. `refused` is None when the judge cannot say (empty output, unparsed,
    or a judge that rates harm rather than refusal). `evidence` holds the matched phrase or the
    judge's raw final output. Nothing is ever defaulted: an unreadable verdict stays `unparsed`.
    """

    judge_id: str
    label: str
    refused: bool | None = None
    score: float | None = None
    evidence: str | None = None
    truncated: bool = False
    unparsed: bool = False
    injection_flags: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for `samples.jsonl`."""
        out = asdict(self)
        out["injection_flags"] = list(self.injection_flags)
        return out


class Judge(ABC):
    """Scores model outputs; `describe()` is recorded in `run.json` next to every number."""

    key: ClassVar[str]
    version: ClassVar[int] = 1
    config_cls: ClassVar[type[Any]]

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any, loaded: LoadedModel | None = None) -> Judge:
        """Build from a `config_cls` instance; `loaded` is the evaluated model (direction judge)."""

    @property
    @abstractmethod
    def judge_id(self) -> str:
        """Stable identity written into every verdict, e.g. `keyword@1:anchored:project-v1`."""

    @abstractmethod
    def score(self, prompt: str, response: str) -> Verdict:
        """Judge one response to one prompt."""

    def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Judge many (prompt, response) pairs; judges that batch override this."""
        return [self.score(p, r) for p, r in pairs]

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able identity: key, version, judge_id and settings."""


JUDGES: Registry[type[Judge]] = Registry("judge")
