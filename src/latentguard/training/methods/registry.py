"""The `METHODS` registry: name -> `TrainingMethod` subclass."""

from __future__ import annotations

from latentguard.registry import Registry
from latentguard.training.methods.base import TrainingMethod

__all__ = ["METHODS"]

METHODS: Registry[type[TrainingMethod]] = Registry("training method")
