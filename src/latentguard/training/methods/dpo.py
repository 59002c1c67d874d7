"""`dpo`: trl's DPO unchanged (its loss, β and reference model), the baseline FPO is compared with."""

from __future__ import annotations

from latentguard.training.methods.registry import METHODS
from latentguard.training.preference import PreferenceMethod

__all__ = ["DPOMethod"]


@METHODS.register("dpo")
class DPOMethod(PreferenceMethod):
    """Direct preference optimisation as trl's DPOTrainer computes it (default `loss_type` sigmoid,
    reference log-probs from the adapter-disabled model with LoRA, or from a frozen copy with --full)."""
