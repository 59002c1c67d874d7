"""One registry class for every pluggable family (defenses, judges, datasets, ...)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from latentguard.errors import ConfigError

__all__ = ["Registry", "load_plugins"]

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
