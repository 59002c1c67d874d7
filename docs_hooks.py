"""mkdocs hook (mkdocs.yml `hooks:`): keep the nav in step with the pages that exist.

- A nav entry naming a page that does not exist is dropped (with its section, if that empties it),
  so the nav may list method pages that other work adds later and `mkdocs build --strict` still passes.
- A top-level docs/*.md page that no nav entry names is appended to the "Methods" section, titled by
  its first heading, so a new method page needs no edit here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXTRA_SECTION = "Methods"


def _prune(items: list[Any], docs: Path) -> list[Any]:
    kept: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                value = _prune(value, docs)
                if value:
                    kept.append({title: value})
            elif _exists(value, docs):
                kept.append(item)
        elif _exists(item, docs):
            kept.append(item)
    return kept


def _exists(page: str, docs: Path) -> bool:
    return "://" in page or (docs / page).is_file()


def _named(items: list[Any]) -> set[str]:
    out: set[str] = set()
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out |= _named(value) if isinstance(value, list) else {value}
    return out


def on_config(config: Any) -> Any:
    if not config.nav:
        return config
    docs = Path(config.docs_dir)
    nav = _prune(config.nav, docs)
    extra = sorted(p.name for p in docs.glob("*.md") if p.name not in _named(nav))
    if extra:
        section = next((i for i in nav if isinstance(i, dict) and EXTRA_SECTION in i), None)
        if section is None:
            section = {EXTRA_SECTION: []}
            nav.append(section)
        section[EXTRA_SECTION].extend(extra)
    config.nav = nav
    return config
