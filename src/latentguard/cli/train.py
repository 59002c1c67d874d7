"""`latentguard train`: fine-tune with a registered method (sft, ...) on a mix of data sets, or
with a preference method (dpo, fpo) on a pairs file.

Flags: latentguard's `TrainConfig` fields, every registered method's own config fields, and
short names for the usual trl fields (`--epochs --lr --batch-size --grad-accum --max-len --seed`).
`--config run.yaml` may set any field of the method's trl config (`SFTConfig`, or `DPOConfig` for
preference methods). Runs unchanged under `accelerate launch`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click
from trl import DPOConfig, SFTConfig

from latentguard.cli.options import build_config, field_option
from latentguard.errors import ConfigError, DataError
from latentguard.eval.datasets import shared_data_dir
from latentguard.registry import load_plugins
from latentguard.training import METHODS, TrainConfig, train

__all__ = ["command"]

F = TypeVar("F", bound=Callable[..., Any])
_TRL_FIELDS = {f.name for cfg in (SFTConfig, DPOConfig) for f in dataclasses.fields(cfg)}

# short flag -> SFTConfig field
_ALIASES = {
    "out": "output_dir", "epochs": "num_train_epochs", "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
    "max_len": "max_length", "seed": "seed", "max_steps": "max_steps", "save_steps": "save_steps",
    "warmup_steps": "warmup_steps", "bf16": "bf16",
}


def _own_fields(cls: type[Any]) -> list[str]:
    """Fields latentguard's configs add to trl's (model, data or pairs, method, LoRA, method settings)."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in _TRL_FIELDS]


def _flag_fields() -> list[tuple[str, str, Any, str]]:
    """(flag name, config field, type, help) for every flag `train` accepts."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = [(a, f, hints[f], fields[f].metadata.get("help", "")) for a, f in _ALIASES.items()]
    out += [(n, n, hints[n], fields[n].metadata.get("help", "")) for n in _own_fields(TrainConfig)]
    owners: dict[str, list[str]] = {}
    for name in METHODS.names():
        cls = METHODS.get(name).config_cls
        if cls is not TrainConfig:
            for n in _own_fields(cls):
                owners.setdefault(n, []).append(name)
    seen = {o[0] for o in out}
    for n, names in owners.items():
        if n not in seen:
            cls = METHODS.get(names[0]).config_cls
            help_ = next(f for f in dataclasses.fields(cls) if f.name == n).metadata.get("help", "")
            out.append((n, n, typing.get_type_hints(cls)[n], f"[{', '.join(names)}] {help_}"))
    return out


def _options(f: F) -> F:
    for flag, _, tp, help_ in reversed(_flag_fields()):
        f = field_option(flag, tp, help_)(f)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                        help="YAML of settings (any SFTConfig field); flags given here win.")(f)


def _config(config_file: str | None, flags: dict[str, Any]) -> TrainConfig:
    values = {field: flags[flag] or None if isinstance(flags[flag], tuple) else flags[flag]
              for flag, field, _, _ in _flag_fields()}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    load_plugins()
    method = values.get("method") or "sft"
    cls = METHODS.get(method).config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    stray = sorted(k for k, v in values.items() if v is not None and k not in known)
    if stray:
        raise ConfigError(f"--{stray[0].replace('_', '-')} does not apply to method {method!r}; drop it or pick its method.")
    if values.get("data_dir") is None and "data_dir" in known:
        try:
            values["data_dir"] = str(shared_data_dir())
        except DataError:
            pass  # named sets then raise, naming LATENTGUARD_SHARED_DATA
    return build_config(cls, config_file, values)


@click.command("train")
@_options
def command(config_file: str | None, **flags: Any) -> int:
    """Fine-tune a model (LoRA by default); resumable with --resume; see docs/training.md."""
    cfg = _config(config_file, flags)
    result = train(cfg)
    if cfg.process_index == 0 and result.artifact is not None:
        click.echo(f"wrote {result.artifact} (stages and logs in {result.out})")
    elif cfg.process_index == 0:
        adapter = "model" if cfg.full else "adapter"
        click.echo(f"wrote {result.out}/{adapter}, {result.out}/log.jsonl, {result.out}/loss.png")
        if not cfg.full:
            click.echo(f"merge: latentguard merge {result.out} --out MERGED")
    return 0
