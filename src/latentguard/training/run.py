"""`train(config)`: load, mix data, wrap with LoRA, prepare the method, train, save, plot.

A run directory holds `meta.json` (base model fingerprint, method, LoRA, data hashes),
`log.jsonl`, `loss.png`/`loss.html`, trl checkpoints `checkpoint-N/` (adapter in safetensors;
optimizer/scheduler state as transformers writes it, read back with weights_only) and the
final `adapter/` (or `model/` for --full). `latentguard merge` turns `adapter/` into a plain
HF checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from latentguard import __version__
from latentguard.artifacts import SCHEMA_VERSION, Artifact, git_commit, write_json
from latentguard.errors import ArtifactError, ConfigError, DataError, OutputExistsError
from latentguard.models import LoadedModel, ModelInfo, load_model
from latentguard.training.config import LoraSpec, PreferenceConfig, TrainConfig
from latentguard.training.data import Pair, load_spec, pairs_hash, parse_data_spec
from latentguard.training.logs import LOG_FILE, JsonlLogger, write_plot
from latentguard.training.methods import METHODS, TrainingMethod
from latentguard.training.preference import (
    PreferenceMethod,
    PreferenceTrainer,
    pairs_sha256,
    preference_dataset,
    read_preference_pairs,
)
from latentguard.training.trainer import MODULES_KEY, LatentGuardTrainer, save_modules, tapped_model

__all__ = ["RUN_KIND", "TrainResult", "check_run_model", "lora_config", "read_run_meta", "train", "train_preference",
           "wrap_lora"]

RUN_KIND = "training_run"
METHOD_DIR = "method"


@dataclass
class TrainResult:
    out: Path
    trainer: Trainer | None  # LatentGuardTrainer (PreferenceTrainer for preference methods); None when a
    # multi-stage method had nothing left to train
    metrics: dict[str, Any]
    artifact: Path | None = None  # what a multi-stage method produced (e.g. the MoGU artefact)


def read_run_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "meta.json"
    if not path.is_file():
        raise ArtifactError(f"{run_dir} is not a training run (no meta.json); pass the --out of `latentguard train`.")
    meta = json.loads(path.read_text())
    if meta.get("kind") != RUN_KIND:
        raise ArtifactError(f"{path} is a {meta.get('kind')!r}, not a {RUN_KIND}; pass a training run directory.")
    return meta


def check_run_model(run_dir: str | Path, meta: dict[str, Any], info: ModelInfo) -> None:
    """Refuse a run directory that was trained on another model (fingerprint check)."""
    saved = meta["model"]
    if saved["fingerprint"] != info.fingerprint:
        raise ArtifactError(
            f"{run_dir} was trained on {saved['model_id']!r} (fingerprint {saved['fingerprint']}), but the model "
            f"given is {info.model_id!r} ({info.fingerprint}); pass --model {meta.get('model_spec')} or a new --out."
        )


def lora_config(model: nn.Module, spec: LoraSpec) -> LoraConfig:
    """PEFT LoRA config on `spec.targets`; a target that matches no module raises naming the candidates."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    for t in spec.targets:
        if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(
                f"LoRA target {t!r} matches no module of {type(model).__name__}; use some of {', '.join(leaves)} "
                "(or q,k,v,o) in --lora targets=..."
            )
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules="all-linear" if "all-linear" in spec.targets else list(spec.targets))


def wrap_lora(model: nn.Module, spec: LoraSpec) -> PeftModel:
    """`model` wrapped with PEFT LoRA on `spec.targets` (see `lora_config`)."""
    return get_peft_model(model, lora_config(model, spec))


def _load_sources(cfg: TrainConfig) -> list[tuple[Any, list[Pair]]]:
    if not cfg.data:
        raise DataError("No training data; pass --data NAME_OR_FILE[:weight] (e.g. --data gsm8k-train:0.1).")
    specs = [parse_data_spec(d) for d in cfg.data]
    return [(s, load_spec(s, cfg.data_dir, cfg.prompt_column, cfg.response_column)) for s in specs]


def _to_dataset(sources: list[tuple[Any, list[Pair]]]) -> Dataset:
    rows: list[dict[str, Any]] = []
    for s, (_, pairs) in enumerate(sources):
        for p in pairs:
            rows.append({"prompt": [{"role": "user", "content": p.prompt}],
                         "completion": [{"role": "assistant", "content": p.response}],
                         "lg_index": len(rows), "lg_source": s})
    return Dataset.from_list(rows)


def _prepare_out(cfg: TrainConfig | PreferenceConfig, out: Path) -> str | None:
    """Check the output directory; return the checkpoint to resume from (if --resume)."""
    if cfg.resume:
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise ConfigError(f"--resume given but {out} holds no checkpoint-N/; drop --resume to start a new run.")
        return last
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise OutputExistsError(f"Output {out} already exists; pass --resume to continue it, --overwrite, or another --out.")
        with cfg.main_process_first(desc="clear output"):
            if cfg.process_index == 0:
                shutil.rmtree(out)
    return None


def _data_meta(sources: list[tuple[Any, list[Pair]]]) -> list[dict[str, Any]]:
    return [{"source": s.source, "weight": s.weight, "rows": len(p), "sha256": pairs_hash(p)} for s, p in sources]


def _write_meta(out: Path, cfg: TrainConfig | PreferenceConfig, loaded: LoadedModel, data: list[dict[str, Any]]) -> None:
    spec = cfg.lora_spec
    write_json(out / "meta.json", {
        "kind": RUN_KIND, "schema": SCHEMA_VERSION, "latentguard_version": __version__,
        "latentguard_commit": git_commit(),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model_spec": str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model,
        "model": loaded.info.as_meta(), "method": cfg.method,
        "lora": dataclasses.asdict(spec) if spec else None, "full": cfg.full,
        "data": data,
        "config": {k: v for k, v in cfg.to_dict().items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    })


def _build_model(cfg: TrainConfig, method: TrainingMethod, loaded: LoadedModel) -> nn.Module:
    model = loaded.model.train()
    set_seed(cfg.seed)  # LoRA A matrices and a method's extra modules are drawn from cfg.seed, not from the global RNG
    spec = cfg.lora_spec
    if spec is not None:
        model = wrap_lora(model, spec)
    elif cfg.lora_none and not cfg.full:
        model.requires_grad_(False)
    extra = method.add_modules(tapped_model(model))
    if cfg.lora_none and not cfg.full and not extra:
        raise ConfigError(f"--lora none trains only a method's extra modules, and method {cfg.method!r} adds none; "
                          "pass a LoRA spec or --full.")
    if extra:
        model.add_module(MODULES_KEY, nn.ModuleDict(extra))
        getattr(model, MODULES_KEY).requires_grad_(True)
    return model


def _prepare_method(method: TrainingMethod, trainer: LatentGuardTrainer | PreferenceTrainer, out: Path, loaded: LoadedModel,
                    resuming: bool) -> None:
    art_dir = out / METHOD_DIR
    if resuming and art_dir.is_dir():
        method.restore(Artifact.load(art_dir, model=loaded.info))
        return
    model = cast(nn.Module, trainer.model).eval()  # reference statistics without dropout
    art = method.prepare(model, trainer.train_dataset, trainer.data_collator)
    if art is not None and trainer.args.process_index == 0:
        art.save(art_dir, model=loaded.info)


def train(cfg: TrainConfig | PreferenceConfig) -> TrainResult:
    """Run one fine-tuning job as configured; returns the run directory and the trainer."""
    method = METHODS.get(cfg.method)(cast(Any, cfg))
    if (method.kind == "preference") != isinstance(cfg, PreferenceConfig):
        raise ConfigError(f"Method {cfg.method!r} takes a {method.config_cls.__name__}, not a {type(cfg).__name__}; "
                          "build that config (the CLI does).")
    if isinstance(cfg, PreferenceConfig):
        return train_preference(cfg, cast(PreferenceMethod, method))
    staged = method.run()  # a multi-stage method calls train() once per stage itself
    if staged is not None:
        return cast(TrainResult, staged)
    out = Path(str(cfg.output_dir))
    checkpoint = _prepare_out(cfg, out)
    sources = _load_sources(cfg)
    loaded = load_model(cfg.model, dtype=cfg.model_dtype)
    if checkpoint is not None:
        check_run_model(out, read_run_meta(out), loaded.info)
    method.setup(loaded)
    model = _build_model(cfg, method, loaded)
    trainer = LatentGuardTrainer(
        model=model, args=cfg, train_dataset=_to_dataset(sources), processing_class=loaded.tokenizer,
        method=method, weights=[s.weight for s, _ in sources], callbacks=[JsonlLogger(out / LOG_FILE)],
    )
    out.mkdir(parents=True, exist_ok=True)
    if cfg.process_index == 0 and checkpoint is None:
        _write_meta(out, cfg, loaded, _data_meta(sources))
    _prepare_method(method, trainer, out, loaded, checkpoint is not None)
    metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    final = out / ("model" if cfg.full else "adapter")
    trainer.save_model(str(final))
    if cfg.process_index == 0:
        (final / "training_args.bin").unlink(missing_ok=True)  # a pickle, and meta.json has the config
        save_modules(cast(nn.Module, trainer.model), final)
    if cfg.process_index == 0 and cfg.plot and (out / LOG_FILE).is_file():
        write_plot(out / LOG_FILE, f"{cfg.method} on {loaded.info.model_id}: {', '.join(cfg.data)}")
    return TrainResult(out=out, trainer=trainer, metrics=metrics)


def train_preference(cfg: PreferenceConfig, method: PreferenceMethod,
                     callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """`train` for preference methods (trl's DPOTrainer): same run directory, resume and outputs.

    `callbacks` are added to the trainer's (e.g. per-step cost measurements).
    """
    out = Path(str(cfg.output_dir))
    checkpoint = _prepare_out(cfg, out)
    pairs = read_preference_pairs(str(cfg.pairs))
    loaded = load_model(cfg.model, dtype=cfg.model_dtype)
    if checkpoint is not None:
        check_run_model(out, read_run_meta(out), loaded.info)
    method.setup(loaded)
    spec = cfg.lora_spec
    trainer = PreferenceTrainer(
        model=loaded.model.train(), args=cfg, train_dataset=preference_dataset(pairs),
        processing_class=loaded.tokenizer, peft_config=lora_config(loaded.model, spec) if spec else None,
        method=method, callbacks=[JsonlLogger(out / LOG_FILE), *method.callbacks(), *callbacks],
    )
    out.mkdir(parents=True, exist_ok=True)
    if cfg.process_index == 0 and checkpoint is None:
        kinds = {k: sum(p.kind == k for p in pairs) for k in sorted({p.kind for p in pairs})}
        _write_meta(out, cfg, loaded, [{"source": str(cfg.pairs), "rows": len(pairs), "sha256": pairs_sha256(pairs),
                                        "kinds": kinds}])
    _prepare_method(method, trainer, out, loaded, checkpoint is not None)
    metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    final = out / ("model" if cfg.full else "adapter")
    trainer.save_model(str(final))
    if cfg.process_index == 0:
        (final / "training_args.bin").unlink(missing_ok=True)  # a pickle, and meta.json has the config
        if cfg.plot and (out / LOG_FILE).is_file():
            write_plot(out / LOG_FILE, f"{cfg.method} on {loaded.info.model_id}: {Path(str(cfg.pairs)).name}")
    return TrainResult(out=out, trainer=trainer, metrics=metrics)
