"""Fine-tuning on trl + PEFT: a method registry, data mixing, live hidden-state losses, runs, merge.

`train(TrainConfig(...))` runs one job; `METHODS` holds `sft`, `procon`, `mllr` and later methods; `LOSSES` holds
pure loss functions; `merge_run` turns a LoRA run into a plain Hugging Face checkpoint.
"""

from latentguard.training.capture import capture_live
from latentguard.training.config import LoraSpec, TrainConfig, parse_lora
from latentguard.training.data import (
    TRAIN_SETS,
    DataSpec,
    Pair,
    load_spec,
    parse_data_spec,
    read_pairs,
)
from latentguard.training.losses import (
    LOSSES,
    layer_projections,
    projection_loss,
    projection_penalty,
    projections,
)
from latentguard.training.merge import merge_run
from latentguard.training.methods import METHODS, TrainBatch, TrainingMethod
from latentguard.training.mixing import MixtureSampler, epoch_plan, per_epoch_count
from latentguard.training.run import TrainResult, train
from latentguard.training.trainer import LatentGuardTrainer

__all__ = [
    "LOSSES",
    "METHODS",
    "TRAIN_SETS",
    "DataSpec",
    "LatentGuardTrainer",
    "LoraSpec",
    "MixtureSampler",
    "Pair",
    "TrainBatch",
    "TrainConfig",
    "TrainResult",
    "TrainingMethod",
    "capture_live",
    "epoch_plan",
    "layer_projections",
    "load_spec",
    "merge_run",
    "parse_data_spec",
    "parse_lora",
    "per_epoch_count",
    "projection_loss",
    "projection_penalty",
    "projections",
    "read_pairs",
    "train",
]
