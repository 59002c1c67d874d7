"""Jailbreak attacks: one registry (`ATTACKS`) run through the eval harness as `--attack NAME`.

An attack either rewrites each harmful request into the conversation that is sent (template
families, RADIAL) or transforms the model while it generates (`ablate`: refusal-direction
ablation hooks; `harmful-ft`: the weights of a harmful fine-tune swapped in). Both kinds share
one interface, so the runner treats them alike. The judge always grades the response against the
ORIGINAL request, never the wrapped prompt; `judged_response` picks the part of the answer that
belongs to it (e.g. the harmful item of a RADIAL list).

Specs are `NAME[:ARTEFACT][,key=value...]`, like defences; a comma list of specs names several
attacks (`none,radial,prefix-injection,ablate:out/dir/direction`), and `templates` expands to every
template family.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from latentguard.errors import ConfigError
from latentguard.models import LoadedModel
from latentguard.models.chat import Message
from latentguard.registry import Registry, spec_config

__all__ = [
    "ATTACKS",
    "TEMPLATE_ALIAS",
    "Attack",
    "AttackContext",
    "AttackedPrompt",
    "NoAttack",
    "attack_config",
    "build_attack",
    "check_attack_spec",
    "expand_attack_specs",
    "parse_attack_spec",
    "split_specs",
    "user_turn",
]

TEMPLATE_ALIAS = "templates"  # expands to every attack whose family is "template"


def user_turn(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


@dataclass
class AttackedPrompt:
    """What is sent for one harmful request.

    Args:
        messages: the conversation (user turns, possibly earlier assistant turns); the system
            prompt is added by the eval's template policy, as for unattacked prompts.
        follow_up: a further user turn sent after the model's first answer (RADIAL's
            "Could you please elaborate on the third instruction (3.)?").
        item: 1-based number of the harmful request inside a numbered list, if it is one.
    """

    messages: list[Message]
    follow_up: str | None = None
    item: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackContext:
    """What building and preparing an attack may use.

    Args:
        data_dir: the shared data folder (benign instruction pools), when available.
        work_dir: where an attack caches what it computes (eval: `OUT/attacks/`).
        read_prompts: reads a user prompt file spec `PATH[:COLUMN]` (the eval's reader).
    """

    loaded: LoadedModel
    system: str | None = None
    seed: int = 0
    data_dir: Path | None = None
    work_dir: Path | None = None
    read_prompts: Callable[[str], list[str]] | None = None


class Attack(ABC):
    """A jailbreak; `describe()` is recorded in run.json and in the key of every generation."""

    key: ClassVar[str]
    family: ClassVar[str] = "prompt"  # "none" | "template" | "prompt" | "model"
    config_cls: ClassVar[type[Any] | None] = None  # dataclass of the k=v parameters, if any
    needs_artefact: ClassVar[bool] = False
    usage: ClassVar[str] = ""  # how to write the spec, named in errors
    spec: str = ""

    @classmethod
    @abstractmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], ctx: AttackContext) -> Attack:
        """Build from the parsed spec; check artefacts against `ctx.loaded` (cheap: no scoring here)."""

    def prepare(self, ctx: AttackContext) -> None:
        """Expensive set-up (RADIAL's tendency ranking), run once the output folder exists."""

    def attack_prompts(self, requests: Sequence[str]) -> list[AttackedPrompt]:
        """The conversation sent for each harmful request (default: the request itself)."""
        return [AttackedPrompt(user_turn(r)) for r in requests]

    def apply(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context manager transforming the model while it generates (default: nothing)."""
        return contextlib.nullcontext()

    def judged_response(self, item: AttackedPrompt, response: str, follow_up: bool = False) -> str | None:
        """The part of `response` that answers the harmful request; None = it was not executed."""
        return response

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able identity: key, parameters, artefact path and fingerprint."""

    @property
    def changes_prompts(self) -> bool:
        return self.family in ("template", "prompt")

    @property
    def label(self) -> str:
        """Short name for tables: the key plus the parameters that differ from the defaults."""
        d = self.describe()
        cfg = d.get("config", {})
        default = dataclasses.asdict(self.config_cls()) if self.config_cls is not None else {}
        changed = [f"{k}={v}" if len(str(v)) <= 12 else f"{k}=…" for k, v in cfg.items() if k in default and default[k] != v]
        return self.key + (f"({','.join(changed)})" if changed else "")


ATTACKS: Registry[type[Attack]] = Registry("attack")


@ATTACKS.register("none")
class NoAttack(Attack):
    """The request as it is (the baseline row of the matrix)."""

    key = "none"
    family = "none"

    @classmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], ctx: AttackContext) -> Attack:
        return cls()

    def describe(self) -> dict[str, Any]:
        return {"attack": "none"}


def split_specs(text: str) -> list[str]:
    """Split a comma list of specs; a `key=value` part belongs to the spec before it."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part.partition("=")[0]:
            if not specs:
                raise ConfigError(f"Parameter {part!r} in {text!r} follows no spec; write NAME[:ARTEFACT],key=value.")
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def parse_attack_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """`NAME[:ARTEFACT][,k=v...]` -> (name, artefact, params)."""
    head, *kvs = [p.strip() for p in spec.split(",")]
    params: dict[str, str] = {}
    for kv in kvs:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ConfigError(f"Bad attack parameter {kv!r} in {spec!r}; write key=value.")
        params[k.replace("-", "_")] = v
    name, _, art = head.partition(":")
    return name, (art or None), params


def expand_attack_specs(text: str | Sequence[str] | None) -> list[str]:
    """Attack specs from a comma list (or list of them); `templates` becomes every template family."""
    _import_builtin()
    raw = split_specs(text) if isinstance(text, str) else [s for t in (text or []) for s in split_specs(t)]
    out: list[str] = []
    for spec in raw:
        if spec == TEMPLATE_ALIAS:
            out += [n for n in ATTACKS.names() if ATTACKS.get(n).family == "template"]
        else:
            out.append(spec)
    return list(dict.fromkeys(out))


def attack_config(cls: type[Attack], params: dict[str, str]) -> Any:
    """The attack's config dataclass built from spec parameters (validated by its __post_init__)."""
    if cls.config_cls is None:
        if params:
            raise ConfigError(f"Attack {cls.key!r} takes no parameters; got {sorted(params)}.")
        return None
    return spec_config(cls.config_cls, params, f"{cls.key!r}")


def check_attack_spec(spec: str) -> None:
    """Validate name, artefact presence and parameters without loading anything."""
    _import_builtin()
    name, art, params = parse_attack_spec(spec)
    cls = ATTACKS.get(name)
    if cls.needs_artefact and art is None:
        raise ConfigError(f"Attack {name!r} needs an artefact; write {cls.usage or name + ':PATH'}.")
    attack_config(cls, params)


def build_attack(spec: str, ctx: AttackContext) -> Attack:
    _import_builtin()
    check_attack_spec(spec)
    name, art, params = parse_attack_spec(spec)
    attack = ATTACKS.get(name).from_spec(art, params, ctx)
    attack.spec = spec
    return attack


def _import_builtin() -> None:
    """Import the modules that register the built-in attacks (registration happens on import)."""
    from latentguard.attacks import ablate, harmful_ft, radial, templates  # noqa: F401


_import_builtin()  # at the end: the modules import the names above
