"""Artefacts: a directory holding `tensors.safetensors` and `meta.json`, never pickle.

Every artefact is stamped with the fingerprint of the model it was computed on; loading
checks kind, schema version, model shape and fingerprint and names any mismatch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentguard import __version__
from latentguard.errors import ArtifactError, OutputExistsError

__all__ = [
    "SCHEMA_VERSION",
    "Artifact",
    "git_commit",
    "sha256_of_file",
    "sha256_of_texts",
    "staged_dir",
    "write_json",
]

SCHEMA_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"


class _ModelStamp(Protocol):
    @property
    def fingerprint(self) -> str: ...

    def as_meta(self) -> dict[str, Any]: ...


@functools.cache
def git_commit() -> str | None:
    """Commit of the latentguard checkout, or None when installed from a wheel."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            check=False,
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def sha256_of_texts(texts: list[str]) -> str:
    """Order-sensitive hash of a list of prompts (what a data set contributed)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory next to `out`; move it to `out` only if the block succeeds.

    On error the temp directory is removed and an existing `out` is left untouched.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"Output {out} already exists; pass --overwrite or choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)


@dataclass
class Artifact:
    """A named bundle of tensors plus JSON metadata, stamped with a model fingerprint."""

    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str], model: _ModelStamp | None = None) -> Path:
        """Write `path/tensors.safetensors` and `path/meta.json` (directory created)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta)
        meta.update(
            kind=self.kind,
            schema=SCHEMA_VERSION,
            latentguard_version=__version__,
            latentguard_commit=git_commit(),
            created_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in self.tensors.items()},
        )
        if model is not None:
            meta["model"] = model.as_meta()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(path / TENSORS_FILE), metadata={"kind": self.kind})
        write_json(path / META_FILE, meta)
        self.meta = meta
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expect: str | None = None,
        model: _ModelStamp | None = None,
        allow_fingerprint_mismatch: bool = False,
    ) -> Artifact:
        """Load and check an artefact; `model` enables the shape and fingerprint checks."""
        path = Path(path)
        meta_path, tensor_path = path / META_FILE, path / TENSORS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ArtifactError(
                f"{path} is not an artefact directory (needs {META_FILE} and {TENSORS_FILE}); "
                "pass the directory a latentguard command wrote."
            )
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(tensor_path))
        except (json.JSONDecodeError, SafetensorError, OSError) as e:
            raise ArtifactError(f"Artefact {path} is corrupt ({e}); recreate it.") from e
        art = cls(kind=meta.get("kind", "?"), tensors=tensors, meta=meta)
        art._check(path, expect, model, allow_fingerprint_mismatch)
        return art

    def _check(
        self, path: Path, expect: str | None, model: _ModelStamp | None, allow_mismatch: bool
    ) -> None:
        if expect is not None and self.kind != expect:
            raise ArtifactError(f"{path} holds a {self.kind!r} artefact, not {expect!r}; pass a {expect} artefact.")
        if self.meta.get("schema") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{path} has schema {self.meta.get('schema')}, this latentguard reads {SCHEMA_VERSION}; "
                "recreate the artefact with this version."
            )
        if model is None or "model" not in self.meta:
            return
        _check_model(path, self.meta["model"], model.as_meta(), allow_mismatch)


def _check_model(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any], allow: bool) -> None:
    for key in ("model_type", "n_layers", "d_model", "n_heads", "head_dim"):
        if saved.get(key) != current.get(key):
            raise ArtifactError(
                f"{path} was built on a model with {key}={saved.get(key)}, this model has "
                f"{key}={current.get(key)}; rebuild the artefact on this model."
            )
    if saved.get("fingerprint") != current.get("fingerprint"):
        msg = (
            f"{path} was built on model fingerprint {saved.get('fingerprint')} "
            f"({saved.get('model_id')}), this model is {current.get('fingerprint')} "
            f"({current.get('model_id')})"
        )
        if not allow:
            raise ArtifactError(msg + "; rebuild it on this model, or allow the mismatch explicitly "
                                "(direction defences and the ablate attack: add any_model=1 to the spec).")
        warnings.warn(msg + "; same shapes, applying anyway (e.g. a fine-tune of the same base).", stacklevel=3)
