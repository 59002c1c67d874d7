"""`TrainConfig`: trl's `SFTConfig` plus latentguard's fields (model, data mix, method, LoRA).

Method configs subclass `TrainConfig` (so every training config is an `SFTConfig`); the CLI
builds flags from the latentguard fields and accepts any `SFTConfig` field via `--config run.yaml`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from latentguard.errors import ConfigError

__all__ = ["TARGET_ALIASES", "LoraSpec", "TrainConfig", "parse_lora"]

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


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig(SFTConfig):
    """Fine-tuning run: SFTConfig with CPU-friendly defaults and latentguard's own fields."""

    model: str = field(default="embedded", metadata=_help("model spec: embedded, a directory, a .gguf file or a hub id"))
    data: list[str] = field(default_factory=list, metadata=_help(
        "NAME_OR_FILE[:weight], repeatable; weight 0.5 = that fraction per epoch, 100 = that many rows per epoch"))
    method: str = field(default="sft", metadata=_help("training method (latentguard list methods)"))
    lora: str = field(default="r=8,alpha=16,targets=q,k,v,o", metadata=_help("LoRA r, alpha, dropout and target modules"))
    full: bool = field(default=False, metadata=_help("full fine-tuning instead of LoRA"))
    prompt_column: str | None = field(default=None, metadata=_help("prompt column of data files (default: auto)"))
    response_column: str | None = field(default=None, metadata=_help("response column of data files (default: auto)"))
    data_dir: str | None = field(default=None, metadata=_help("folder of the named data sets (default: the shared data folder)"))
    resume: bool = field(default=False, metadata=_help("resume from the last checkpoint in the output directory"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing output directory"))
    plot: bool = field(default=True, metadata=_help("write loss.png and loss.html next to log.jsonl"))
    # trl / transformers defaults changed for small CPU runs
    output_dir: str | None = field(default=None, metadata=_help("run directory: log, checkpoints, adapter"))
    learning_rate: float = field(default=2e-4, metadata=_help("peak learning rate"))
    num_train_epochs: float = field(default=1.0, metadata=_help("epochs over the (re-sampled) data mix"))
    max_length: int | None = field(default=512, metadata=_help("truncate prompt+response to this many tokens"))
    logging_steps: float = field(default=1, metadata=_help("log every N optimizer steps"))
    save_steps: float = field(default=50, metadata=_help("checkpoint every N optimizer steps"))
    save_total_limit: int | None = field(default=2, metadata=_help("checkpoints kept"))
    completion_only_loss: bool | None = field(default=True, metadata=_help("loss on response tokens only"))
    bf16: bool = field(default=False, metadata=_help("bfloat16 mixed precision (GPU)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("deprecated alias of activation_checkpointing"))
    activation_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    report_to: str | list[str] | None = field(default="none", metadata=_help("trackers (none, tensorboard, wandb, ...)"))
    optim: str = field(default="adamw_torch", metadata=_help("optimizer name"))

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("No output directory; pass --out DIR.")
        if not torch.cuda.is_available():
            self.use_cpu = True
        super().__post_init__()
        if not self.completion_only_loss:
            raise ConfigError("completion_only_loss=False trains on prompts; latentguard masks prompts, keep it true.")
        if self.full and self.lora != TrainConfig.lora:
            raise ConfigError("--full and --lora exclude each other; drop one.")
        if not self.full:
            parse_lora(self.lora)
        if not re.fullmatch(r"[a-z0-9_]+", self.method):
            raise ConfigError(f"method={self.method!r}; use a registered name (latentguard list methods).")

    @property
    def lora_spec(self) -> LoraSpec | None:
        return None if self.full else parse_lora(self.lora)
