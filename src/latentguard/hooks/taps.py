"""Taps: read activations at named sites, reduced to the positions asked for, kept on CPU.

`capture` is the low-level context manager (one record per forward pass); `collect` runs
batched, left-padded forwards over prompts (or prompt/response pairs) with a progress bar
and returns one tensor per site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from latentguard.errors import ConfigError, DataError
from latentguard.hooks.edits import edit
from latentguard.hooks.sites import Site, parse_sites

__all__ = ["POSITIONS", "Batch", "capture", "collect", "encode_batch", "position_ids_from_mask"]

POSITIONS = ("last", "mean", "response_mean", "response_tokens")
Positions = str | Sequence[int]


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions that ignore left padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Batch:
    """A left-padded batch; `select` marks the tokens a mean/token reduction uses."""

    input_ids: Tensor
    attention_mask: Tensor
    select: Tensor

    def forward_kwargs(self) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": position_ids_from_mask(self.attention_mask),
        }


def encode_batch(
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str] | Sequence[tuple[str, str]],
    device: torch.device | str = "cpu",
) -> Batch:
    """Tokenise formatted texts, or (prompt, response) pairs with an exact boundary, left-padded.

    For pairs, `select` marks the response tokens; for plain texts, every real token.
    """
    rows: list[list[int]] = []
    sel: list[list[int]] = []
    for t in texts:
        if isinstance(t, tuple):
            p = tok(t[0], add_special_tokens=False)["input_ids"]
            r = tok(t[1], add_special_tokens=False)["input_ids"]
            rows.append(p + r)
            sel.append([0] * len(p) + [1] * len(r))
        else:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            rows.append(ids)
            sel.append([1] * len(ids))
    if any(len(r) == 0 for r in rows):
        raise DataError("A prompt tokenised to zero tokens; drop empty prompts from the input.")
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def left(xs: list[int], fill: int) -> list[int]:
        return [fill] * (width - len(xs)) + xs

    return Batch(
        input_ids=torch.tensor([left(r, pad) for r in rows], device=device),
        attention_mask=torch.tensor([left([1] * len(r), 0) for r in rows], device=device),
        select=torch.tensor([left(s, 0) for s in sel], device=device),
    )


@dataclass
class _Reducer:
    """Reduces [B, T, ...] activations to the requested positions for the current batch."""

    positions: Positions
    select: Tensor | None = field(default=None)

    def __call__(self, x: Tensor) -> Tensor:
        pos = self.positions
        if not isinstance(pos, str):
            return x[:, list(pos)]
        if pos == "last":
            return x[:, -1]
        if self.select is None or self.select.shape[:2] != x.shape[:2]:
            raise ConfigError(f"positions={pos!r} needs the batch's token mask; use collect().")
        m = self.select.to(x.dtype).reshape(*self.select.shape, *([1] * (x.dim() - 2)))
        if pos in ("mean", "response_mean"):
            return (x * m).sum(1) / m.sum(1).clamp(min=1)
        return x[self.select.bool()]  # response_tokens: [n_tokens, ...]


@contextmanager
def capture(
    model: nn.Module,
    sites: Sequence[str | Site],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[dict[str, list[Tensor]]]:
    """Record activations at `sites` on every forward inside the block.

    Yields `{site: [tensor per forward]}`; each tensor is `reduce(activation)` (default: the
    whole activation), detached and moved to CPU float32. Hooks are removed on exit, also on error.
    """
    keys = [str(s) for s in parse_sites(model, list(sites))]
    records: dict[str, list[Tensor]] = {k: [] for k in keys}

    def recorder(key: str) -> Callable[[Tensor], None]:
        def fn(x: Tensor) -> None:
            y = reduce(x) if reduce is not None else x
            records[key].append(y.detach().to("cpu", torch.float32))

        return fn

    with edit(model, {k: recorder(k) for k in keys}):
        yield records


def _check_positions(positions: Positions, pairs: bool) -> None:
    if isinstance(positions, str):
        if positions not in POSITIONS:
            raise ConfigError(f"positions={positions!r}; use one of {POSITIONS} or a list of negative indices.")
        if positions.startswith("response") and not pairs:
            raise ConfigError(f"positions={positions!r} needs (prompt, response) pairs as input.")
    elif not positions or any(p >= 0 for p in positions):
        raise ConfigError(f"positions={list(positions)}; give negative indices from the end, e.g. [-5, -4, -3, -2, -1].")


@torch.no_grad()
def collect(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str] | Sequence[tuple[str, str]],
    sites: Sequence[str | Site],
    positions: Positions = "last",
    batch_size: int = 16,
    progress: bool | str = True,
) -> dict[str, Float[Tensor, "n ..."]]:
    """Run batched forwards and return `{site: activations}` on CPU float32.

    Shapes per site: `last`/`mean`/`response_mean` -> [n, d]; a list of P negative indices ->
    [n, P, d]; `response_tokens` -> [total response tokens, d]. head_out sites add a head axis.
    Texts must already be formatted (see `models.format_prompts`); forwards use mask-derived
    position ids, so a prompt's captures do not depend on how much left padding its batch needs.
    """
    if not texts:
        raise DataError("No prompts to run; pass at least one prompt.")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; use >= 1.")
    _check_positions(positions, isinstance(texts[0], tuple))
    device = next(model.parameters()).device
    reducer = _Reducer(positions)
    out: dict[str, list[Tensor]] = {}
    desc = progress if isinstance(progress, str) else "forward"
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, unit="prompt")
    with capture(model, sites, reduce=reducer) as rec:
        for start in range(0, len(texts), batch_size):
            batch = encode_batch(tok, texts[start : start + batch_size], device)
            reducer.select = batch.select
            model(**batch.forward_kwargs(), use_cache=False)
            bar.update(len(batch.input_ids))
        out = rec
    bar.close()
    return {k: torch.cat(v) for k, v in out.items()}
