"""The generation-free refusal proxy (refusal_direction.md §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from latentguard.errors import ConfigError

__all__ = ["refusal_metric", "refusal_token_ids"]


def refusal_metric(logits: Float[Tensor, "n vocab"], token_ids: Sequence[int]) -> Float[Tensor, " n"]:
    """log P_ref − log(1 − P_ref), P_ref = softmax mass on the refusal tokens; float64 (§3, §9.9)."""
    if not token_ids:
        raise ConfigError("No refusal tokens given; pass at least one (e.g. 'I').")
    p = torch.softmax(logits.double(), dim=-1)
    p_ref = p[..., list(token_ids)].sum(-1)
    return torch.log(p_ref + 1e-8) - torch.log(1 - p_ref + 1e-8)


def refusal_token_ids(tok: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """Token ids of the first token of each word as it would start an assistant reply."""
    ids = []
    for w in words:
        toks = tok(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"Refusal token {w!r} tokenises to nothing; pass a visible word such as 'I'.")
        ids.append(int(toks[0]))
    return sorted(set(ids))
