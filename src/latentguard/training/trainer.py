"""`LatentGuardTrainer`: trl's SFTTrainer plus the method extension points and data mixing.

- `compute_loss` taps the method's sites live during trl's own forward and adds the method's
  loss terms (logged under their names next to trl's metrics).
  Values from the method's `metrics()` are logged the same way without entering the loss.
- `create_optimizer` takes the method's parameter groups (per-module learning rates).
- `_get_train_sampler` re-samples the data mix every epoch (seeded, identical on every rank).
- Extra trainable modules are saved next to every checkpoint and loaded back on resume; with
  `--lora none` they are all a checkpoint holds.
- A method with `replaces_ce` supplies the whole loss (its own CE from `TrainBatch.log_probs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import SFTTrainer

from latentguard.errors import ArtifactError, ConfigError
from latentguard.models import LoadedModel
from latentguard.training.capture import capture_live
from latentguard.training.methods.base import TrainBatch, TrainingMethod
from latentguard.training.mixing import MixtureSampler, per_epoch_count

__all__ = ["MODULES_FILE", "MODULES_KEY", "LatentGuardTrainer", "load_modules", "modules_only", "save_modules", "tapped_model"]

MODULES_KEY = "latentguard_modules"  # attribute holding a method's extra modules
MODULES_FILE = "latentguard_modules.safetensors"
_INDEX, _SOURCE = "lg_index", "lg_source"  # dataset columns: row id and mix source


def modules_only(args: Any) -> bool:
    """`--lora none` without `--full`: only the method's extra modules train."""
    return not getattr(args, "full", False) and str(getattr(args, "lora", "")).strip().lower() == "none"


def tapped_model(model: nn.Module | None) -> nn.Module:
    """The plain HF model under DDP / PEFT wrappers, whose blocks the taps resolve."""
    if model is None:
        raise ConfigError("The trainer has no model; pass one to the trainer.")
    while isinstance(getattr(model, "module", None), nn.Module) and not isinstance(model, PeftModel):
        model = cast(nn.Module, model.module)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def live_loaded(model: nn.Module, loaded: LoadedModel) -> LoadedModel:
    """The model under training as a LoadedModel (tokenizer and identity of `loaded`), for the read-only
    analyses a method runs before training (directions, module scores)."""
    return LoadedModel(model=cast(Any, tapped_model(model)), tokenizer=loaded.tokenizer, info=loaded.info)


def save_modules(model: nn.Module, directory: str | Path) -> None:
    mods = getattr(model, MODULES_KEY, None)
    if mods is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in mods.state_dict().items()}
        save_file(state, str(Path(directory) / MODULES_FILE))


def load_modules(model: nn.Module, directory: str | Path) -> None:
    mods = getattr(model, MODULES_KEY, None)
    path = Path(directory) / MODULES_FILE
    if mods is None:
        return
    if not path.is_file():
        raise ArtifactError(f"{directory} lacks {MODULES_FILE} for the method's extra modules; resume from a run of the same method.")
    mods.load_state_dict(load_file(str(path)))


class _IndexCollator:
    """Wraps trl's collator: strips the mix columns from the rows and adds `lg_index` to the batch."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{k: v for k, v in r.items() if k not in (_INDEX, _SOURCE)} for r in rows])
        batch[_INDEX] = torch.tensor([r[_INDEX] for r in rows])
        return batch


class _ModuleSaver(TrainerCallback):
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero:
            save_modules(kw["model"], Path(str(args.output_dir)) / f"checkpoint-{state.global_step}")


class LatentGuardTrainer(SFTTrainer):
    """SFTTrainer running a `TrainingMethod`; `weights` are the per-source mix weights."""

    def __init__(self, *args: Any, method: TrainingMethod, weights: Sequence[float | int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        self.weights = list(weights)
        self.data_collator = _IndexCollator(self.data_collator)
        self.add_callback(_ModuleSaver())
        for callback in method.callbacks():
            self.add_callback(callback)
        self._sites = method.sites(tapped_model(self.model))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*(self._signature_columns or []), _INDEX, _SOURCE]  # type: ignore[assignment]

    def _get_train_sampler(self, train_dataset: Any = None) -> MixtureSampler:
        sources = cast(Any, train_dataset or self.train_dataset)[_SOURCE]
        groups: list[list[int]] = [[] for _ in self.weights]
        for row, s in enumerate(sources):
            groups[s].append(row)
        counts = [per_epoch_count(w, len(g)) for w, g in zip(self.weights, groups, strict=True)]
        return MixtureSampler(groups, counts, self.args.data_seed or self.args.seed)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """trl's loss plus the method's terms, from hidden states of the same forward."""
        index = inputs.pop(_INDEX, None)
        with capture_live(tapped_model(model), self._sites) as hidden:
            if self.method.replaces_ce:  # trl's fused forward (label log-probs, no logits); the method makes the loss
                outputs = model(**inputs, use_cache=False, fused_lm_head=True)
                loss = outputs.log_probs.new_zeros(())
            else:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                loss, outputs = result if return_outputs else (result, None)
        ids = inputs["input_ids"]
        batch = TrainBatch(ids, inputs.get("attention_mask", torch.ones_like(ids)), inputs["labels"],
                           index if index is not None else torch.arange(len(ids)),
                           outputs.log_probs if self.method.replaces_ce else None)
        terms = self.method.loss_terms(hidden, batch, model)
        mode = "train" if model.training else "eval"
        for name, term in terms.items():
            self._metrics[mode][name].append(float(term.detach()))
            loss = loss + term * self._term_scale(num_items_in_batch)
        for name, value in self.method.metrics().items():
            self._metrics[mode][name].append(value)
        return (loss, outputs) if return_outputs else loss

    def _term_scale(self, num_items_in_batch: Any) -> float:
        """Per-batch mean terms need the 1/GA factor that a token-count-normalised CE already has."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = cast(nn.Module, model or self.model)
        groups = self.method.param_groups(opt_model) if self.optimizer is None else None
        if groups is None:
            return super().create_optimizer(model)
        _check_groups(opt_model, groups)
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, cast(Any, opt_model))
        self.optimizer = cls([{"weight_decay": self.args.weight_decay, **g} for g in groups], **kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not modules_only(self.args):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_modules(cast(nn.Module, self.model), resume_from_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """With `--lora none` a checkpoint holds the method's modules only (the base never changes)."""
        if not modules_only(self.args):
            super()._save(output_dir, state_dict)
        elif self.args.should_save:
            out = Path(str(output_dir or self.args.output_dir))
            out.mkdir(parents=True, exist_ok=True)
            save_modules(cast(nn.Module, self.model), out)


def _check_groups(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    seen: list[int] = [id(p) for g in groups for p in g["params"]]
    missing = sorted(n for i, n in trainable.items() if i not in seen)
    if missing or len(seen) != len(set(seen)):
        raise ConfigError(
            f"The method's parameter groups must hold each trainable parameter once; missing {missing[:3]} "
            f"({len(missing)}), duplicates {len(seen) - len(set(seen))}; fix its param_groups()."
        )
