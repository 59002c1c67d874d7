"""`TrainConfig`: trl's `SFTConfig` plus latentguard's fields (model, data mix, method, LoRA);
`PreferenceConfig`: trl's `DPOConfig` plus the same run fields and `--pairs`.

Method configs subclass one of the two (SFT methods `TrainConfig`, preference methods
`PreferenceConfig`); the CLI builds flags from the latentguard fields and accepts any trl
config field via `--config run.yaml`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, SFTConfig

from latentguard.errors import ConfigError

__all__ = ["TARGET_ALIASES", "LoraSpec", "PreferenceConfig", "TrainConfig", "parse_lora"]

# Short LoRA target names -> module names of the Llama-like layout (others pass through).
TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
_LORA_KEYS = ("r", "alpha", "dropout", "targets")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_lora(text: str) -> LoraSpec:
    """Parse `r=8,alpha=16,dropout=0.05,targets=q,k,v,o` (targets takes the rest of the list)."""
    values: dict[str, str] = {}
    key = None
    for part in (p.strip() for p in text.split(",") if p.strip()):
        k, eq, v = part.partition("=")
        if eq and k in _LORA_KEYS:
            key, values[k] = k, v
        elif key == "targets" and not eq:
            values["targets"] += "," + part
        else:
            raise ConfigError(f"Bad --lora part {part!r} in {text!r}; write r=8,alpha=16,dropout=0.05,targets=q,k,v,o.")
    try:
        spec = LoraSpec(
            r=int(values.get("r", 8)),
            alpha=int(values.get("alpha", 16)),
            dropout=float(values.get("dropout", 0.0)),
            targets=tuple(TARGET_ALIASES.get(t, t) for t in values.get("targets", "q,k,v,o").split(",") if t),
        )
    except ValueError as e:
        raise ConfigError(f"Bad number in --lora {text!r} ({e}); write r=8,alpha=16,dropout=0.05.") from e
    if spec.r < 1 or not spec.targets or not 0 <= spec.dropout < 1:
        raise ConfigError(f"--lora {text!r}: need r >= 1, at least one target and 0 <= dropout < 1.")
    return spec


MODEL_DTYPES = ("float32", "bfloat16", "float16")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class _RunFields:
    """latentguard's fields and CPU-friendly trl defaults shared by every training config."""

    model: str = field(default="embedded", metadata=_help("model spec: embedded, a directory, a .gguf file or a hub id"))
    model_dtype: str = field(default="float32", metadata=_help(
        "dtype the model is loaded in: float32, or bfloat16 / float16 to halve a GPU's weight memory "
        "(LoRA weights stay float32; merging reloads the base in the same dtype)"))
    lora: str = field(default="r=8,alpha=16,targets=q,k,v,o", metadata=_help(
        "LoRA r, alpha, dropout and target modules; 'none' trains only the method's extra modules"))
    full: bool = field(default=False, metadata=_help("full fine-tuning instead of LoRA"))
    resume: bool = field(default=False, metadata=_help("resume from the last checkpoint in the output directory"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing output directory"))
    plot: bool = field(default=True, metadata=_help("write loss.png and loss.html next to log.jsonl"))
    # trl / transformers defaults changed for small CPU runs
    output_dir: str | None = field(default=None, metadata=_help("run directory: log, checkpoints, adapter"))
    num_train_epochs: float = field(default=1.0, metadata=_help("epochs over the (re-sampled) data mix"))
    logging_steps: float = field(default=1, metadata=_help("log every N optimizer steps"))
    save_steps: float = field(default=50, metadata=_help("checkpoint every N optimizer steps"))
    save_total_limit: int | None = field(default=2, metadata=_help("checkpoints kept"))
    bf16: bool = field(default=False, metadata=_help("bfloat16 mixed precision (GPU)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("deprecated alias of activation_checkpointing"))
    activation_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    report_to: str | list[str] | None = field(default="none", metadata=_help("trackers (none, tensorboard, wandb, ...)"))
    optim: str = field(default="adamw_torch", metadata=_help("optimizer name"))

    def _check_before_trl(self) -> None:
        if not self.output_dir:
            raise ConfigError("No output directory; pass --out DIR.")
        if not torch.cuda.is_available():
            self.use_cpu = True

    def _check_after_trl(self, method: str) -> None:
        if self.model_dtype not in MODEL_DTYPES:
            raise ConfigError(f"--model-dtype {self.model_dtype!r} is not one of {', '.join(MODEL_DTYPES)}; pick one.")
        if self.full and self.lora != _RunFields.lora:
            raise ConfigError("--full and --lora exclude each other; drop one.")
        if not self.full and not self.lora_none:
            parse_lora(self.lora)
        if not re.fullmatch(r"[a-z0-9_]+", method):
            raise ConfigError(f"method={method!r}; use a registered name (latentguard list methods).")

    @property
    def lora_none(self) -> bool:
        """`--lora none`: no adapter, the base stays frozen, only the method's extra modules train."""
        return self.lora.strip().lower() == "none"

    @property
    def lora_spec(self) -> LoraSpec | None:
        return None if self.full or self.lora_none else parse_lora(self.lora)


@dataclass
class TrainConfig(_RunFields, SFTConfig):  # type: ignore[misc]  # trl's own field types disagree with TrainingArguments
    """Fine-tuning run: SFTConfig with CPU-friendly defaults and latentguard's own fields."""

    data: list[str] = field(default_factory=list, metadata=_help(
        "NAME_OR_FILE[:weight], repeatable; weight 0.5 = that fraction per epoch, 100 = that many rows per epoch"))
    method: str = field(default="sft", metadata=_help("training method (latentguard list methods)"))
    prompt_column: str | None = field(default=None, metadata=_help("prompt column of data files (default: auto)"))
    response_column: str | None = field(default=None, metadata=_help("response column of data files (default: auto)"))
    data_dir: str | None = field(default=None, metadata=_help("folder of the named data sets (default: the shared data folder)"))
    learning_rate: float = field(default=2e-4, metadata=_help("peak learning rate"))
    max_length: int | None = field(default=512, metadata=_help("truncate prompt+response to this many tokens"))
    completion_only_loss: bool | None = field(default=True, metadata=_help("loss on response tokens only"))

    def __post_init__(self) -> None:
        self._check_before_trl()
        super().__post_init__()
        if not self.completion_only_loss:
            raise ConfigError("completion_only_loss=False trains on prompts; latentguard masks prompts, keep it true.")
        self._check_after_trl(self.method)


@dataclass
class PreferenceConfig(_RunFields, DPOConfig):  # type: ignore[misc]  # as TrainConfig
    """Preference run (`dpo`, `fpo`): DPOConfig with the spec's FPO/DPO training defaults (fpo.md §3).

    Paper recipe: Adam betas (0.9, 0.95), weight decay 1e-4, grad clip 1.0, lr 5e-7 with 150 warm-up
    steps then constant, 32 pairs per step (here 4 per device x 8 accumulation), length 1024.
    """

    pairs: str | None = field(default=None, metadata=_help("preference pairs: JSONL/JSON/CSV with prompt, chosen, rejected"))
    method: str = field(default="dpo", metadata=_help("training method (latentguard list methods)"))
    learning_rate: float = field(default=5e-7, metadata=_help("peak learning rate"))
    max_length: int | None = field(default=1024, metadata=_help("truncate prompt+response to this many tokens"))
    per_device_train_batch_size: int = field(default=4, metadata=_help("pairs per device and step"))
    gradient_accumulation_steps: int = field(default=8, metadata=_help("micro-batches per optimizer step"))
    warmup_steps: float = field(default=150, metadata=_help("linear warm-up steps"))
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata=_help("learning-rate schedule"))
    adam_beta2: float = field(default=0.95, metadata=_help("Adam beta2"))
    weight_decay: float = field(default=1e-4, metadata=_help("weight decay"))

    def __post_init__(self) -> None:
        self._check_before_trl()
        super().__post_init__()
        if not self.pairs:
            raise ConfigError("No preference pairs; pass --pairs FILE (prompt, chosen, rejected; "
                              "`latentguard reference pairs` builds the safety pairs).")
        if self.lora_none and not self.full:
            raise ConfigError("--lora none trains only a method's extra modules and preference methods add none; "
                              "pass a LoRA spec or --full.")
        self._check_after_trl(self.method)
