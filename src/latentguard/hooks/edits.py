"""Edits: interventions on activations, each a context manager that always removes its hooks.

Edits never modify activations in place: each returns a new tensor. Vectors are cast to
the activation's device and dtype once, outside the hook.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from latentguard.errors import ConfigError
from latentguard.hooks.sites import ActivationFn, Site, all_sites, hook_site, parse_sites

__all__ = ["ablation_sites", "add_vectors", "edit", "project_out"]


def _param_like(model: nn.Module) -> Tensor:
    return next(model.parameters())


@contextmanager
def edit(model: nn.Module, fns: Mapping[str | Site, ActivationFn]) -> Iterator[None]:
    """Apply `fn(activation)` at each site for every forward inside the block; a fn that returns
    None only reads (taps), one that returns a tensor replaces the activation (edits)."""
    sites = parse_sites(model, list(fns))
    handles: list[RemovableHandle] = []
    try:
        for s, fn in zip(sites, fns.values(), strict=True):
            handles.append(hook_site(model, s, fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _check_finite(name: str, value: float | Tensor) -> None:
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise ConfigError(f"{name}={value} is not finite; pass a finite number.")


@contextmanager
def add_vectors(
    model: nn.Module, vectors: Mapping[str | Site, Float[Tensor, ...]], alpha: float = 1.0
) -> Iterator[None]:
    """Add `alpha * vector` at every position of each site (activation addition).

    A `head_out.l` vector has shape [n_heads, head_dim] (zeros for untouched heads);
    other sites take [d_model].
    """
    _check_finite("alpha", alpha)
    ref = _param_like(model)
    fns: dict[str | Site, Callable[[Tensor], Tensor]] = {}
    for site, vec in vectors.items():
        _check_finite(f"vector at {site}", vec)
        v = (alpha * vec.detach()).to(ref.device, ref.dtype)
        fns[site] = functools.partial(torch.add, other=v)
    with edit(model, fns):
        yield


def ablation_sites(model: nn.Module) -> list[Site]:
    """Where directional ablation acts (refusal_direction.md §6): every block input and the
    attention and MLP outputs before they are added, so the stream never carries r̂."""
    return all_sites(model, "resid_pre") + all_sites(model, "attn_out") + all_sites(model, "mlp_out")


@contextmanager
def project_out(
    model: nn.Module,
    direction: Float[Tensor, " d_model"],
    sites: Sequence[str | Site] | None = None,
) -> Iterator[None]:
    """Directional ablation: x <- x - r̂ (r̂ᵀx) at `sites` (default: `ablation_sites`)."""
    _check_finite("direction", direction)
    norm = direction.norm()
    if norm == 0:
        raise ConfigError("The direction to project out is zero; pass a non-zero direction.")
    ref = _param_like(model)
    r = (direction.detach().double() / norm.double()).to(ref.device, ref.dtype)

    def ablate(x: Tensor) -> Tensor:
        return x - (x @ r).unsqueeze(-1) * r

    with edit(model, {s: ablate for s in (sites if sites is not None else ablation_sites(model))}):
        yield
