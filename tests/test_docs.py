"""The documentation site: `mkdocs build --strict` passes, the nav hook, and the tutorials' commands exist."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "mkdocs is not installed: pip install -c constraints.txt -e '.[docs]' (or `make docs`)"


def _load_hook():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs_hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_site_builds_strictly(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(INSTALL)
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for page in ("index", "tutorials/scan", "tutorials/defend", "tutorials/finetune", "tutorials/evaluate",
                 "tutorials/serve", "artefacts", "scan", "reference/models", "reference/hooks"):
        assert (site / page / "index.html" if page != "index" else site / "index.html").is_file(), page
    api = (site / "reference" / "models" / "index.html").read_text()
    assert "load_model" in api and "Load model, tokenizer" in api  # rendered from the docstring


def test_nav_hook_drops_missing_pages_and_adds_unlisted_ones(tmp_path: Path) -> None:
    for name in ("index.md", "scan.md", "newmethod.md"):
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "tutorials").mkdir()
    (tmp_path / "tutorials" / "t.md").write_text("# t\n")
    config = SimpleNamespace(docs_dir=str(tmp_path), nav=[
        {"Home": "index.md"},
        {"Tutorials": [{"T": "tutorials/t.md"}, {"Gone": "tutorials/gone.md"}]},
        {"Methods": [{"Scan": "scan.md"}, {"ProCon": "procon.md"}]},
        {"Empty": [{"X": "x.md"}]},
    ])
    _load_hook().on_config(config)
    assert config.nav == [
        {"Home": "index.md"},
        {"Tutorials": [{"T": "tutorials/t.md"}]},
        {"Methods": [{"Scan": "scan.md"}, "newmethod.md"]},
    ]


def _commands(text: str) -> list[list[str]]:
    """`latentguard ...` command lines inside the fenced code blocks of a page (continuations joined)."""
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            at = line.find("latentguard ")
            if at >= 0:
                out.append(shlex.split(line[at:].replace("[", " ").replace("]", " ").replace("|", " "), posix=False))
    return out


def _resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    from latentguard.cli.main import cli

    cmd: click.Command = cli
    ctx = click.Context(cli)
    rest = words[1:]
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"`latentguard {' '.join(words[1:])}`: no command {rest[0]!r}"
        cmd, rest = sub, rest[1:]
    return cmd, rest


@pytest.mark.parametrize("page", sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs" / "tutorials").glob("*.md")))
def test_tutorial_commands_and_flags_exist(page: str) -> None:
    commands = _commands((ROOT / "docs" / page).read_text())
    assert commands, f"{page} shows no latentguard command"
    for words in commands:
        cmd, rest = _resolve(words)
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
        flags = {w.split("=", 1)[0] for w in rest if w.startswith("--")}
        assert flags <= known, f"{page}: `{' '.join(words)}` uses {sorted(flags - known)}, unknown to `{cmd.name}`"
