"""One registry class for every pluggable family (defenses, judges, datasets, ...)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from latentguard.errors import ConfigError

__all__ = ["Registry", "load_plugins", "parse_switch", "spec_config"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object table. Unknown names raise with close matches and the full list."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@DEFENSES.register("add")`."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ConfigError(f"{self.kind} {name!r} is registered twice; rename one of them.")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names()) or '(none)'}."
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def load_plugins() -> list[str]:
    """Import every module advertised under the `latentguard.plugins` entry-point group."""
    loaded = []
    for ep in entry_points(group="latentguard.plugins"):
        ep.load()
        loaded.append(ep.name)
    return loaded


def parse_switch(key: str, value: str) -> bool:
    """`any_model=1` style switches: 1/true/yes or 0/false/no."""
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise ValueError(f"{key}={value!r} is not a switch (use 1 or 0)")


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def spec_config(cls: type[Any], params: dict[str, str], what: str) -> Any:
    """The `k=v` parameters of a spec (`add:DIR,alpha=2`, `radial:DIR,k=3`) as the config dataclass `cls`.

    Values are cast to the field types (bool: 1/0, true/false, yes/no); a field's metadata `parse`
    (a str -> value function) and `fix` (the hint in its error) override. Unknown keys and bad values
    are one-line errors naming the fix; `cls.__post_init__` checks the ranges.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(params) - set(fields))
    if bad:
        raise ConfigError(f"Unknown {what} parameter(s) {bad}; known: {sorted(fields)}.")
    values: dict[str, Any] = {}
    for key, raw in params.items():
        meta, tp = fields[key].metadata, _base_type(hints[key])
        parse = meta.get("parse") or (functools.partial(parse_switch, key) if tp is bool else
                                      tp if tp in (int, float) else str)
        try:
            values[key] = parse(raw)
        except ValueError as e:
            name = "switch" if tp is bool else getattr(tp, "__name__", str(tp))
            fix = meta.get("fix") or ("pass 1 or 0" if tp is bool else f"pass a {name}")
            raise ConfigError(f"{what} parameter {key}={raw!r} is not a valid {name}; {fix}.") from e
    return cls(**values)
