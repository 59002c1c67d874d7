"""Build click options from a config dataclass; `--config run.yaml` supplies defaults, flags win."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click
import yaml

from latentguard.errors import ConfigError

__all__ = ["build_config", "config_options"]

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _click_type(tp: Any) -> tuple[Any, bool]:
    """(click type, is_flag) for a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _click_type(args[0]) if len(args) == 1 else (str, False)
    if tp is bool:
        return bool, True
    if tp in (int, float, str):
        return tp, False
    return str, False


def field_option(name: str, tp: Any, help_: str) -> Callable[[F], F]:
    """A click option for a config field of type `tp`: `--x/--no-x` for bools, repeatable for lists,
    None default (unset)."""
    if typing.get_origin(tp) is list:
        return click.option(_flag(name), name, multiple=True, help=help_)
    click_tp, is_flag = _click_type(tp)
    decl = f"{_flag(name)}/--no-{name.replace('_', '-')}" if is_flag else _flag(name)
    return click.option(decl, name, type=None if is_flag else click_tp, default=None, help=help_, show_default=False)


def config_options(cls: type[Any]) -> Callable[[F], F]:
    """Decorator adding one option per dataclass field (help from `metadata["help"]`) plus `--config`."""
    hints = typing.get_type_hints(cls)

    def deco(f: F) -> F:
        for fld in reversed(dataclasses.fields(cls)):
            if fld.metadata.get("cli") is not False:
                f = field_option(fld.name, hints[fld.name], fld.metadata.get("help", ""))(f)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            default=None, help="YAML file of settings; flags given here win.")(f)

    return deco


def read_yaml_mapping(path: Path, what: str, missing_fix: str, shape: str) -> dict[str, Any]:
    """A YAML file holding a mapping; a missing file, bad syntax or another shape is one line naming the fix."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {missing_fix}.")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML ({e}); fix its syntax.") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold {shape}.")
    return loaded


def build_config(cls: type[C], config_file: str | None, flags: dict[str, Any]) -> C:
    """Merge YAML settings and explicit flags (flags win) into `cls`; names unknown keys."""
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        loaded = read_yaml_mapping(path, "Config file", "pass an existing YAML file", "a mapping of settings")
        names = {f.name for f in dataclasses.fields(cast(Any, cls))}
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ConfigError(f"Unknown settings {unknown} in {path}; known: {sorted(names)}.")
        values.update(loaded)
    values.update({k: v for k, v in flags.items() if v is not None})
    return cls(**values)
