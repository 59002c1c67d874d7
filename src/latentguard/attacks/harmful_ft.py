"""`harmful-ft:PATH`: the harmful fine-tuning attack as a model transform (no training in eval).

PATH is a fine-tune of the evaluated model, built beforehand:
- a merged checkpoint, e.g. `refs/aligned-harmfulft` from `latentguard reference build`
  (100 AdvBench goal -> "Sure, here is ..." rows) or the output of `latentguard merge`;
- a `latentguard train` run directory (its `adapter/` is merged in memory, or its `model/`);
- a LoRA adapter directory inside such a run (e.g. `checkpoint-N/`).
While the attacked cells generate, the fine-tuned weights are swapped into the evaluated model
(parameter storage only, restored on exit, also on error), so the defences of each matrix column,
built and checked against the evaluated model, run on the fine-tuned weights: the scenario of
SafetyLock (a defence built on the aligned model, a user fine-tuning it afterwards).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentguard.attacks import ATTACKS, Attack, AttackContext, attack_config
from latentguard.errors import ArtifactError
from latentguard.models import LoadedModel, fingerprint, load_model

__all__ = ["HarmfulFTAttack", "HarmfulFTConfig", "swap_weights"]


@dataclass
class HarmfulFTConfig:
    allow_other_base: bool = field(default=False, metadata={"help": "accept a fine-tune whose base is not the evaluated model (or cannot be told)"})


_MERGED_META = "latentguard.json"  # training.merge.MERGED_META (training pulls in trl: imported on use)


def _run_dir_of(path: Path) -> Path | None:
    for p in (path, path.parent, path.parent.parent):
        if (p / "meta.json").is_file() and json.loads((p / "meta.json").read_text()).get("kind") == "training_run":
            return p
    return None


def _base_check(path: Path, base_fp: str | None, loaded: LoadedModel, allow: bool) -> None:
    if base_fp == loaded.info.fingerprint or allow:
        return
    what = f"was fine-tuned from fingerprint {base_fp}" if base_fp else "does not record the model it was fine-tuned from"
    raise ArtifactError(f"{path} {what}, but the evaluated model is {loaded.info.model_id!r} ({loaded.info.fingerprint}); "
                        "pass the fine-tune of this model, or add allow_other_base=1 to attack with it anyway.")


def _merged_adapter(loaded: LoadedModel, adapter: Path) -> nn.Module:
    from peft import PeftModel  # only adapters need peft here

    return PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(adapter)).merge_and_unload()


def _load_finetune(path: Path, loaded: LoadedModel, allow: bool) -> tuple[nn.Module, str]:
    """(fine-tuned model, source kind), after checking it is a fine-tune of `loaded`."""
    run = _run_dir_of(path)
    if run is not None:
        from latentguard.training.run import check_run_model, read_run_meta

        meta = read_run_meta(run)
        if not allow:
            check_run_model(run, meta, loaded.info)
        adapter = path if (path / "adapter_config.json").is_file() else run / "adapter"
        if (adapter / "adapter_config.json").is_file():
            return _merged_adapter(loaded, adapter), "adapter"
        if (run / "model" / "config.json").is_file():
            return load_model(str(run / "model"), device=str(loaded.model.device)).model, "full"
        raise ArtifactError(f"{run} holds no finished adapter/ or model/; let the training run finish first.")
    if (path / "adapter_config.json").is_file():
        _base_check(path, None, loaded, allow)
        return _merged_adapter(loaded, path), "adapter"
    if (path / "config.json").is_file():
        meta_file = path / _MERGED_META
        base = json.loads(meta_file.read_text()).get("base_model", {}) if meta_file.is_file() else {}
        _base_check(path, base.get("fingerprint"), loaded, allow)
        return load_model(str(path), device=str(loaded.model.device)).model, "merged"
    raise ArtifactError(f"{path} is not a fine-tuned model: pass a merged checkpoint (refs/aligned-harmfulft, "
                        "`latentguard merge --out`), a `latentguard train` run directory or an adapter directory.")


@contextlib.contextmanager
def swap_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Point every parameter of `model` at `weights[name]` inside the block; restored in `finally`."""
    saved: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    try:
        for name, p in params.items():
            saved[name] = p.data
            p.data = weights[name]
        yield
    finally:
        for name, data in saved.items():
            params[name].data = data


@ATTACKS.register("harmful-ft")
class HarmfulFTAttack(Attack):
    """`harmful-ft:PATH`: a harmful fine-tune of this model (refs/aligned-harmfulft or a `latentguard train` run)."""

    key = "harmful-ft"
    usage = "harmful-ft:PATH with PATH refs/aligned-harmfulft (`latentguard reference build`) or a `latentguard train` run"
    family = "model"
    config_cls = HarmfulFTConfig
    needs_artefact = True

    def __init__(self, path: str, weights: dict[str, torch.Tensor], source: str, ft_fingerprint: str,
                 cfg: HarmfulFTConfig) -> None:
        self.path, self.weights, self.source, self.ft_fingerprint, self.cfg = path, weights, source, ft_fingerprint, cfg

    @classmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], ctx: AttackContext) -> Attack:
        cfg = attack_config(cls, params)
        path = Path(str(artefact))
        if not path.exists():
            raise ArtifactError(f"Harmful fine-tune {path} does not exist; build it with `latentguard reference build` "
                                "(refs/aligned-harmfulft) or `latentguard train`, then pass its path.")
        ft, source = _load_finetune(path, ctx.loaded, cfg.allow_other_base)
        mine = dict(ctx.loaded.model.named_parameters())
        theirs = {n: p.detach().to(mine[n].device, mine[n].dtype) for n, p in ft.named_parameters() if n in mine}
        bad = [n for n, p in mine.items() if n not in theirs or theirs[n].shape != p.shape]
        if bad:
            raise ArtifactError(f"{path} does not match the evaluated model's parameters (first: {bad[0]}); "
                                "pass a fine-tune of the same architecture and size.")
        return cls(str(artefact), theirs, source, fingerprint(ft), cfg)

    def apply(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return swap_weights(model, self.weights)

    def describe(self) -> dict[str, Any]:
        return {"attack": self.key, "artefact": self.path, "source": self.source,
                "finetune_fingerprint": self.ft_fingerprint, "config": asdict(self.cfg)}
