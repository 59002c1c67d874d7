"""A token window: an intervention that acts on the first K response tokens, then hands over to the base.

The intervention exposes one switch (`active`); these context managers flip it during `generate`:
- `first_k_generate` (faithful, mogu.md §1.4 `handoff=recompute`): swaps `model.generate` for the
  block. K tokens are generated with the switch on; the switch goes off and the unmodified model
  re-prefills prompt + prefix and continues (one model copy, its own KV cache). Rows that stopped
  inside the window stay stopped. Works for every caller of `model.generate` (eval, serve, CLI).
- `first_k_steps` (approximate, `handoff=keep_cache`): one `generate`; the prefill and the first
  K−1 decode steps run with the switch on, later steps off, and the KV cache written under the
  intervention is kept.
A plain forward outside `generate` sees the switch as the caller left it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from latentguard.errors import ConfigError

__all__ = ["Switch", "first_k_generate", "first_k_steps"]


class Switch(Protocol):
    """What a token window flips: the intervention acts while `active` is true."""

    active: bool


def _gen_budget(model: Any, kwargs: dict[str, Any], width: int) -> int:
    cfg = kwargs.get("generation_config") or model.generation_config
    n = kwargs.get("max_new_tokens", getattr(cfg, "max_new_tokens", None))
    if n is None:
        n = int(kwargs.get("max_length", cfg.max_length)) - width
    return int(n)


def _stop_ids(model: Any, kwargs: dict[str, Any]) -> tuple[list[int], int]:
    cfg = kwargs.get("generation_config") or model.generation_config
    eos = kwargs.get("eos_token_id", cfg.eos_token_id)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = kwargs.get("pad_token_id", cfg.pad_token_id)
    return eos_ids, int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


def _two_phase(model: Any, orig: Callable[..., Any], switch: Switch, k: int, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Tensor:
    """K routed tokens, then the base path re-prefills prompt + prefix and continues (handoff=recompute)."""
    if len(args) > 1:
        raise ConfigError("Under first-K routing pass generate's arguments by keyword (input_ids=..., generation_config=...).")
    if args:
        kwargs = {**kwargs, "inputs": args[0]}
    if kwargs.get("streamer") is not None or kwargs.get("return_dict_in_generate"):
        raise ConfigError("First-K routing returns token ids only; drop streamer/return_dict_in_generate, or route every token.")
    ids = kwargs.pop("input_ids", None)
    ids = kwargs.pop("inputs", None) if ids is None else ids
    width = ids.shape[1]
    budget = _gen_budget(model, kwargs, width)
    kwargs.pop("max_length", None)
    least = int(kwargs.pop("min_new_tokens", None) or 0)
    first = min(k, budget)
    try:
        switch.active = True
        out1 = orig(input_ids=ids, **{**kwargs, "max_new_tokens": first, "min_new_tokens": min(least, first)})
        n1 = out1.shape[1] - width
        if n1 < first or n1 >= budget:  # every row stopped inside the routed window, or nothing is left
            return out1
        switch.active = False
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(ids) if mask is None else mask
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], n1)], dim=1)
        out2 = orig(input_ids=out1, attention_mask=mask,
                    **{**kwargs, "max_new_tokens": budget - n1, "min_new_tokens": max(least - n1, 0)})
    finally:
        switch.active = True
    eos, pad = _stop_ids(model, kwargs)
    ended = torch.isin(out1[:, width:], torch.tensor(eos, device=out1.device)).any(1) if eos else None
    if ended is not None and bool(ended.any()):  # rows that stopped in the routed window stay stopped
        out2 = out2.clone()
        out2[ended, width + n1:] = pad
    return out2


@contextlib.contextmanager
def first_k_generate(model: nn.Module, switch: Switch, k: int) -> Iterator[None]:
    inst: Any = model
    had_own = "generate" in inst.__dict__
    saved = inst.__dict__.get("generate")
    orig = inst.generate

    def generate(*args: Any, **kwargs: Any) -> Tensor:
        return _two_phase(inst, orig, switch, k, args, kwargs)

    try:
        inst.generate = generate
        yield
    finally:
        if had_own:
            inst.generate = saved
        else:
            del inst.generate


@contextlib.contextmanager
def first_k_steps(model: nn.Module, switch: Switch, k: int) -> Iterator[None]:
    """handoff=keep_cache: route the prefill (step 0) and decode steps 1..K-1; later steps run the base path."""
    step = [0]

    def pre(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.2x passes `cache`
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        step[0] = 0 if seen == 0 else step[0] + 1
        switch.active = step[0] < k

    handle = None
    try:
        handle = model.register_forward_pre_hook(pre, with_kwargs=True)
        yield
    finally:
        if handle is not None:
            handle.remove()
        switch.active = True
