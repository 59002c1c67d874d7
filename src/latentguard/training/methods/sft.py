"""`sft`: supervised fine-tuning on response tokens, nothing added."""

from __future__ import annotations

from latentguard.training.methods.base import TrainingMethod
from latentguard.training.methods.registry import METHODS

__all__ = ["SFTMethod"]


@METHODS.register("sft")
class SFTMethod(TrainingMethod):
    """Cross-entropy on response tokens (prompt masked), LoRA or full."""
