"""`TrainingMethod`: what a fine-tuning method may add to plain SFT.

Extension points, each optional:
(a) `sites` + `loss_terms`: extra loss terms from hidden states captured live during the SAME
    forward that computes the cross-entropy (no second forward);
(b) `param_groups`: per-module learning rates, or freezing (set `requires_grad_(False)`);
(c) `add_modules`: extra trainable modules (saved next to every checkpoint);
(d) `prepare` / `restore`: reference statistics computed before training (e.g. directions or
    per-sample anchors from the untuned model), saved as an artefact and restored on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from latentguard.artifacts import Artifact
from latentguard.training.config import TrainConfig

__all__ = ["TrainBatch", "TrainingMethod"]


@dataclass
class TrainBatch:
    """What a loss term sees of the batch. `index` holds each row's position in the training set."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    index: Tensor

    @property
    def response_mask(self) -> Tensor:
        """Tokens that carry cross-entropy loss (prompt and padding are False)."""
        return self.labels != -100


class TrainingMethod:
    """Plain SFT; subclasses override the extension points they need."""

    config_cls: ClassVar[type[TrainConfig]] = TrainConfig

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def sites(self, model: nn.Module) -> list[str]:
        """(a) Tap sites (`resid_pre.3`, ...) captured live during the training forward."""
        return []

    def loss_terms(self, hidden: dict[str, Tensor], batch: TrainBatch, model: nn.Module) -> dict[str, Tensor]:
        """(a) Named scalar terms added to the CE loss (and logged); `hidden` maps site -> activation."""
        return {}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """(b) Optimizer groups `{"params": [...], "lr": ...}` covering every trainable parameter; None = one group."""
        return None

    def add_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """(c) New trainable modules; the method wires them into the forward itself."""
        return {}

    def prepare(self, model: nn.Module, dataset: Any, collate: Any) -> Artifact | None:
        """(d) Reference statistics from the model before any update; `dataset` is the tokenised set."""
        return None

    def restore(self, artifact: Artifact) -> None:
        """(d) Take back what `prepare` returned, when a run resumes."""
