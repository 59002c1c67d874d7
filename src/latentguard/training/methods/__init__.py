"""Training methods: one module per method, registered in `METHODS` under the module's name."""

from latentguard.training.methods import dpo, fpo, mllr, mogu, procon, sft
from latentguard.training.methods.base import TrainBatch, TrainingMethod
from latentguard.training.methods.registry import METHODS

__all__ = ["METHODS", "TrainBatch", "TrainingMethod", "dpo", "fpo", "mllr", "mogu", "procon", "sft"]
