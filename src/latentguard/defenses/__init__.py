"""Inference-time defences: one module per method, each registered in `DEFENSES` by its key.

A defence is built from a spec string `NAME[:ARTEFACT][,key=value...]`, e.g.
`add:out/demo/directions,alpha=2,layer=12`, and applied to a model as a context manager.
Several defences compose in the order given (outermost first).
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from latentguard.errors import ConfigError
from latentguard.models import LoadedModel
from latentguard.registry import Registry

__all__ = ["DEFENSES", "Defense", "apply_defenses", "build_defense", "build_defenses", "parse_defense_spec"]


class Defense(ABC):
    """An intervention applied while the model runs; `describe()` is recorded with every result."""

    key: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], loaded: LoadedModel) -> Defense:
        """Build from the parsed spec; check the artefact against `loaded.info`."""

    @abstractmethod
    def apply(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context manager that attaches the defence's hooks and always removes them."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able identity: key, artefact path and fingerprint, parameters."""


DEFENSES: Registry[type[Defense]] = Registry("defense")


def parse_defense_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """`NAME[:ARTEFACT][,k=v...]` -> (name, artefact, params); a bare artefact dir names itself."""
    head, *kvs = [p.strip() for p in spec.split(",")]
    params: dict[str, str] = {}
    for kv in kvs:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ConfigError(f"Bad defence parameter {kv!r} in {spec!r}; write key=value.")
        params[k] = v
    name, sep, art = head.partition(":")
    if not sep and Path(head).is_dir():  # an artefact directory: its metadata names the defence
        meta = json.loads((Path(head) / "meta.json").read_text()) if (Path(head) / "meta.json").is_file() else {}
        name, art = meta.get("defense", ""), head
        if not name:
            raise ConfigError(f"{head} does not name a defence in its meta.json; write NAME:{head}.")
    return name, (art or None), params


def build_defense(spec: str, loaded: LoadedModel) -> Defense:
    name, art, params = parse_defense_spec(spec)
    _import_builtin()
    return DEFENSES.get(name).from_spec(art, params, loaded)


def build_defenses(specs: Sequence[str], loaded: LoadedModel) -> list[Defense]:
    return [build_defense(s, loaded) for s in specs if s and s != "none"]


@contextlib.contextmanager
def apply_defenses(model: nn.Module, defenses: Sequence[Defense]) -> Iterator[None]:
    """Apply defences in order; all hooks are removed on exit, also on error."""
    with contextlib.ExitStack() as stack:
        for d in defenses:
            stack.enter_context(d.apply(model))
        yield


def _import_builtin() -> None:
    """Import the modules that register built-in defences (registration happens on import)."""
    from latentguard.defenses import conditional, mogu, pas, safetylock, steering  # noqa: F401
