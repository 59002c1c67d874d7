"""`latentguard` entry point: a click group whose subcommands live one per module."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from latentguard import __version__
from latentguard.errors import LatentGuardError

__all__ = ["cli", "main"]

# name -> module defining `command`; a module that does not exist yet is simply not offered.
_COMMANDS = {
    "scan": "latentguard.cli.scan",
    "list": "latentguard.cli.list_cmd",
    "generate": "latentguard.cli.generate",
    "eval": "latentguard.cli.eval",
    "report": "latentguard.cli.report",
    "serve": "latentguard.cli.serve",
    "direction": "latentguard.cli.direction",
    "export": "latentguard.cli.export",
    "drift": "latentguard.cli.drift",
    "analyze": "latentguard.cli.analyze",
    "train": "latentguard.cli.train",
    "merge": "latentguard.cli.merge",
    "reference": "latentguard.cli.reference",
    "lock": "latentguard.cli.lock",
    "steer": "latentguard.cli.steer",
    "attack": "latentguard.cli.attack",
    "sae": "latentguard.cli.sae",
    "reproduce": "latentguard.cli.reproduce",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n, m in _COMMANDS.items() if importlib.util.find_spec(m) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = _COMMANDS.get(name)
        if module is None or importlib.util.find_spec(module) is None:
            return None
        return importlib.import_module(module).command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="latentguard")
def cli() -> None:
    """Read and steer the hidden states of open LLMs: scan, defend, train, evaluate, serve."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a LatentGuardError prints one line and exits 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        rv = cli.main(args=argv, standalone_mode=False)
    except LatentGuardError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    return int(rv or 0)


if __name__ == "__main__":
    sys.exit(main())
