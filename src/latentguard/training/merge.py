"""`merge_run(run_dir, out)`: base model + the run's LoRA adapter -> a plain HF checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft import PeftModel

from latentguard.artifacts import staged_dir, write_json
from latentguard.errors import ArtifactError
from latentguard.models import load_model
from latentguard.training.run import check_run_model, read_run_meta

__all__ = ["MERGED_META", "merge_run"]

MERGED_META = "latentguard.json"


def merge_run(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = False,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Merge `run_dir/adapter` into the base model it was trained on and save model + tokenizer to `out`.

    The base is reloaded from the run's recorded spec and must match its fingerprint.
    """
    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    adapter = run_dir / "adapter"
    if meta.get("full"):
        raise ArtifactError(f"{run_dir} is a full fine-tune; load {run_dir / 'model'} directly, there is nothing to merge.")
    if not (adapter / "adapter_config.json").is_file():
        raise ArtifactError(f"{adapter} holds no finished adapter; let the run finish (or --resume it) first.")
    loaded = load_model(meta["model_spec"], dtype=meta.get("config", {}).get("model_dtype", "float32"))  # as trained
    check_run_model(run_dir, meta, loaded.info)
    merged = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload()
    with staged_dir(out, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_json(tmp / MERGED_META, {
            "merged_from": str(run_dir.resolve()), "base": meta["model_spec"], "base_model": meta["model"],
            "method": meta["method"], "lora": meta["lora"], "data": meta["data"], **(extra_meta or {}),
        })
    return Path(out)
