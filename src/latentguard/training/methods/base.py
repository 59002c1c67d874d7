"""`TrainingMethod`: what a fine-tuning method may add to plain SFT.

Extension points, each optional:
(a) `sites` + `loss_terms`: extra loss terms from hidden states captured live during the SAME
    forward that computes the cross-entropy (no second forward);
(b) `param_groups`: per-module learning rates, or freezing (set `requires_grad_(False)`);
(c) `add_modules`: extra trainable modules (saved next to every checkpoint);
(d) `prepare` / `restore`: reference statistics computed before training (e.g. directions or
    per-sample anchors from the untuned model), saved as an artefact and restored on resume;
(e) `setup`: the loaded model's tokenizer and shape, before any wrapping (read-only);
(f) `metrics` / `callbacks`: values logged next to the loss terms but not added to the loss, and
    trainer callbacks (step-dependent schedules, phase boundaries);
(g) `replaces_ce`: the loss terms replace trl's cross-entropy instead of adding to it (the method
    computes its own from `TrainBatch.log_probs`, the label log-probabilities of the same forward);
(h) `run`: a multi-stage method drives `train()` itself, one call per stage (MoGU).
With `--lora none` only the method's extra modules train (the base stays frozen, and checkpoints
hold those modules alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn
from transformers import TrainerCallback

from latentguard.artifacts import Artifact
from latentguard.models import LoadedModel
from latentguard.training.config import TrainConfig

__all__ = ["TrainBatch", "TrainingMethod"]


@dataclass
class TrainBatch:
    """What a loss term sees of the batch. `index` holds each row's position in the training set."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    index: Tensor
    log_probs: Tensor | None = None  # [batch, seq-1]: log p(labels[:, 1:]), 0 where ignored; graph-attached

    @property
    def response_mask(self) -> Tensor:
        """Tokens that carry cross-entropy loss (prompt and padding are False)."""
        return self.labels != -100


class TrainingMethod:
    """Plain SFT; subclasses override the extension points they need."""

    config_cls: ClassVar[type[TrainConfig]] = TrainConfig
    kind: ClassVar[str] = "sft"  # "preference": trained on trl's DPOTrainer by `training.preference`
    replaces_ce: ClassVar[bool] = False  # (g) loss = sum of the terms alone

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def run(self) -> Any:
        """(h) Run every stage (each a `train()` call) and return the last `TrainResult`; None = one plain run."""
        return None

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

    def setup(self, loaded: LoadedModel) -> None:
        """(e) Called once after loading, before LoRA wrapping: keep the tokenizer or shape if needed."""

    def metrics(self) -> dict[str, float]:
        """(f) Values to log (not added to the loss), polled after every `loss_terms` call and averaged
        over the logging window like the terms."""
        return {}

    def callbacks(self) -> list[TrainerCallback]:
        """(f) Trainer callbacks the method needs (added after the trainer's own)."""
        return []
