"""Preference training on trl's `DPOTrainer`: pairs files, the preference method base, the trainer.

- Pairs files are JSONL / JSON / CSV records with `prompt`, `chosen` and `rejected` strings; they
  become trl conversational rows (user prompt, assistant chosen / rejected) plus `lg_index`.
- `PreferenceTrainer(DPOTrainer)` keeps trl's data pipeline, reference log-probs (online, or
  precomputed once), fused log-prob head, metrics and optimiser. A method with `replaces_loss`
  reads the per-token log-probs and its sites' hidden states of trl's OWN forward (taps, no second
  forward) and returns the loss; trl's loss on the same batch is logged as `dpo_loss`.
`training.train` runs methods of kind "preference" through this trainer (`run.train_preference`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from trl import DPOTrainer

from latentguard.artifacts import sha256_of_texts
from latentguard.errors import DataError
from latentguard.training.capture import capture_live
from latentguard.training.config import PreferenceConfig
from latentguard.training.data import _rows
from latentguard.training.methods.base import TrainingMethod
from latentguard.training.trainer import _INDEX, _IndexCollator, tapped_model

__all__ = [
    "PreferenceBatch",
    "PreferenceMethod",
    "PreferencePair",
    "PreferenceTrainer",
    "pairs_sha256",
    "preference_dataset",
    "read_preference_pairs",
]

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    kind: str = ""  # e.g. "harmful" / "benign" for the safety pairs


def read_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Every record needs non-empty `prompt`, `chosen` and `rejected` strings; `kind` is optional."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise DataError(f"{path} holds no preference pairs; pass records with prompt, chosen and rejected.")
    pairs = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path} record {i} is not an object; write {{\"prompt\", \"chosen\", \"rejected\"}} records.")
        bad = [f for f in PAIR_FIELDS if not isinstance(row.get(f), str) or not row[f].strip()]
        if bad:
            raise DataError(f"{path} record {i}: missing or empty {', '.join(map(repr, bad))}; every record needs "
                            "prompt, chosen and rejected strings.")
        pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"], str(row.get("kind") or "")))
    return pairs


def pairs_sha256(pairs: list[PreferencePair]) -> str:
    return sha256_of_texts([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)])


def preference_dataset(pairs: list[PreferencePair]) -> Dataset:
    """trl conversational preference rows (the model's chat template renders them) plus `lg_index`."""
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p.prompt}], "chosen": [{"role": "assistant", "content": p.chosen}],
         "rejected": [{"role": "assistant", "content": p.rejected}], _INDEX: i}
        for i, p in enumerate(pairs)
    ])


@dataclass
class PreferenceBatch:
    """What a preference loss sees of one batch; rows of the sequence tensors are [chosen; rejected]."""

    log_probs: Tensor  # [2B, T-1] policy log p(next token) from trl's forward, 0 off the completions
    completion_mask: Tensor  # [2B, T] 1 on response tokens
    ref_chosen_logps: Tensor  # [B] summed reference log-probs (trl's precompute)
    ref_rejected_logps: Tensor  # [B]
    hidden: dict[str, Tensor]  # site -> [2B, T, d], graph-attached
    index: Tensor  # [B] each pair's row in the training set
    dpo_loss: Tensor  # trl's loss on this batch

    def lengths(self) -> tuple[Tensor, Tensor]:
        n = self.completion_mask.sum(1).clamp(min=1).to(self.log_probs.dtype)
        c, r = n.chunk(2)
        return c, r

    def mean_logps(self) -> tuple[Tensor, Tensor]:
        """ā(y) = (1/|y|) Σ_t log π(y_t | x, y_<t) over response tokens, chosen and rejected [B] each."""
        shift = self.completion_mask[:, 1:].to(self.log_probs.dtype)
        total = (self.log_probs[:, -shift.shape[1]:] * shift).sum(1)
        c, r = total.chunk(2)
        n_c, n_r = self.lengths()
        return c / n_c, r / n_r

    def ref_mean_logps(self) -> tuple[Tensor, Tensor]:
        n_c, n_r = self.lengths()
        return self.ref_chosen_logps.to(n_c) / n_c, self.ref_rejected_logps.to(n_r) / n_r


class PreferenceMethod(TrainingMethod):
    """A method trained on trl's DPOTrainer. By default trl's own loss (its `loss_type`) is used."""

    kind = "preference"
    config_cls = PreferenceConfig  # type: ignore[assignment]
    replaces_loss: ClassVar[bool] = False

    def preference_loss(self, batch: PreferenceBatch) -> dict[str, Tensor]:
        """With `replaces_loss`: `{"loss": scalar, <name>: scalar to log, ...}` from trl's forward."""
        raise NotImplementedError(f"{type(self).__name__} sets replaces_loss but defines no preference_loss.")

    def reference_sites(self) -> list[str]:
        """Sites to read during trl's reference pass (`precompute_ref_log_probs`), so `prepare` needs
        no second pass over the data; [] (the default) reads nothing."""
        return []

    def collect_reference(self, hidden: dict[str, Tensor], completion_mask: Tensor) -> None:
        """One batch of trl's reference pass, batches in training-set order (single process only)."""


@contextmanager
def _forward_output(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Yield `{"out": output}` of the first forward of `model` inside the block (hook removed on exit)."""
    seen: dict[str, Any] = {}

    def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
        seen.setdefault("out", out)

    handles: list[RemovableHandle] = []
    try:
        handles.append(model.register_forward_hook(hook))
        yield seen
    finally:
        for h in handles:
            h.remove()


class PreferenceTrainer(DPOTrainer):
    """DPOTrainer running a `PreferenceMethod`; rows carry `lg_index` for per-pair reference data."""

    def __init__(self, *args: Any, method: PreferenceMethod, **kwargs: Any) -> None:
        self.method = method
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        # trl's reference pass runs inside DPOTrainer.__init__; one process sees every row in order
        self._ref_sites = method.reference_sites() if getattr(args_, "world_size", 1) == 1 else []
        super().__init__(*args, **kwargs)
        self._ref_sites = []
        self.data_collator = _IndexCollator(self.data_collator)
        self._sites = method.sites(tapped_model(self.model))

    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        """trl's reference log-probs; while trl precomputes them, the method also reads its sites."""
        if not self._ref_sites:
            return super().compute_ref_log_probs(model, inputs)
        with capture_live(tapped_model(model), self._ref_sites) as hidden:
            out = super().compute_ref_log_probs(model, inputs)
        self.method.collect_reference(hidden, inputs["completion_mask"])
        return out

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*(self._signature_columns or []), _INDEX]  # type: ignore[assignment]

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool) -> Any:
        index = inputs.pop(_INDEX, None)
        if not self.method.replaces_loss:
            return super()._compute_loss(model, inputs, return_outputs)
        with capture_live(tapped_model(model), self._sites) as hidden, _forward_output(model) as seen:
            result = super()._compute_loss(model, inputs, return_outputs)
        dpo_loss = result[0] if return_outputs else result
        n_pairs = len(inputs["input_ids"]) // 2
        batch = PreferenceBatch(
            log_probs=seen["out"].log_probs, completion_mask=inputs["completion_mask"],
            ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"],
            hidden=hidden, index=index if index is not None else torch.arange(n_pairs), dpo_loss=dpo_loss,
        )
        terms = self.method.preference_loss(batch)
        loss = terms.pop("loss")
        mode = "train" if model.training else "eval"
        for name, value in {"dpo_loss": dpo_loss, **terms}.items():
            self._metrics[mode][name].append(float(value.detach()))
        return (loss, result[1]) if return_outputs else loss
