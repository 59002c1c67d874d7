"""`latentguard list KIND`: print a registry or the hook sites."""

from __future__ import annotations

import importlib

import click

from latentguard.hooks import SITE_KINDS
from latentguard.registry import Registry, load_plugins

# kind -> (module that defines the registry, attribute)
_REGISTRIES = {
    "defenses": ("latentguard.defenses", "DEFENSES"),
    "attacks": ("latentguard.attacks", "ATTACKS"),
    "judges": ("latentguard.eval.judges", "JUDGES"),
    "datasets": ("latentguard.eval.datasets", "DATASETS"),
    "methods": ("latentguard.training", "METHODS"),
    "losses": ("latentguard.training", "LOSSES"),
    "training-sets": ("latentguard.training", "TRAIN_SETS"),
}


def _registry(kind: str) -> Registry[object]:
    module, attr = _REGISTRIES[kind]
    mod = importlib.import_module(module)
    if kind in ("defenses", "attacks"):  # their built-ins register on import
        mod._import_builtin()
    return getattr(mod, attr)


@click.command("list")
@click.argument("kind", type=click.Choice([*_REGISTRIES, "sites"]))
def command(kind: str) -> int:
    """List a registry (defenses, attacks, judges, datasets, methods, losses, training-sets) or the hook site kinds."""
    load_plugins()
    names = list(SITE_KINDS) if kind == "sites" else _registry(kind).names()
    for name in names:
        click.echo(name)
    return 0
