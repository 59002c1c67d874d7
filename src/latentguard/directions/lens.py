"""Logit lens: each block's output read through the final norm and the unembedding.

Per layer l (output of block l, i.e. `resid_post.l`) and prompt position, the top-k next tokens
and the probability mass on the refusal tokens (§3); the last layer's row equals the model's
own next-token distribution. Softmax in float64. Used to trace where a refusal (or, in R1-style
models, a reflection token such as "Wait") becomes the predicted next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from latentguard.directions.metrics import refusal_token_ids
from latentguard.errors import ConfigError
from latentguard.hooks import capture, encode_batch
from latentguard.models import LoadedModel, arch_of, format_prompts

__all__ = ["LensConfig", "logit_lens"]


@dataclass
class LensConfig:
    top_k: int = field(default=5, metadata={"help": "tokens listed per layer and position"})
    last_positions: int = field(default=16, metadata={"help": "positions kept, counted from the end (0: all)"})
    refusal_tokens: str = field(default="I", metadata={"help": "comma-separated words whose first token counts as refusal"})
    system: str | None = field(default=None, metadata={"help": "system prompt (default: the chat template's own)"})
    raw: bool = field(default=False, metadata={"help": "feed the prompt as is, without the chat template"})

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k}; use >= 1.")
        if self.last_positions < 0:
            raise ConfigError(f"last_positions={self.last_positions}; use >= 0 (0 keeps every position).")


def _text(loaded: LoadedModel, prompt: str, response: str | None, cfg: LensConfig) -> str:
    if not prompt.strip():
        raise ConfigError("The prompt is empty; pass --prompt TEXT.")
    text = prompt if cfg.raw else format_prompts(loaded.tokenizer, [prompt], cfg.system)[0]
    return text + (response or "")


@torch.no_grad()
def _layer_probs(loaded: LoadedModel, text: str, keep: int) -> tuple[list[int], Tensor]:
    """(token ids kept, probabilities [L, T, V] float64) through the lens."""
    model, arch = loaded.model, arch_of(loaded.model)
    batch = encode_batch(loaded.tokenizer, [text], next(model.parameters()).device)
    sites = [f"resid_post.{l}" for l in range(loaded.info.n_layers)]
    with capture(model, sites, reduce=lambda x: x[0, -keep:] if keep else x[0]) as rec:
        model(**batch.forward_kwargs(), use_cache=False)
    resid = torch.stack([rec[s][0] for s in sites])  # [L, T, d] float32 on CPU
    p = next(model.parameters())
    norm, unembed = arch.get(model, arch.final_norm), model.get_output_embeddings()  # type: ignore[operator]
    logits = unembed(norm(resid.to(p.device, p.dtype)))
    ids = batch.input_ids[0].tolist()
    return ids[-keep:] if keep else ids, torch.softmax(logits.double().cpu(), -1)


def _show(tok: Any, ids: list[int]) -> list[str]:
    """Readable token strings: decoded, with newlines and tabs escaped."""
    return [tok.decode([i]).replace("\n", "\\n").replace("\t", "\\t") for i in ids]


def logit_lens(loaded: LoadedModel, prompt: str, cfg: LensConfig, response: str | None = None) -> dict[str, Any]:
    """Lens over the chat-formatted prompt (plus an optional forced response); a JSON-able dict."""
    tok = loaded.tokenizer
    ref = refusal_token_ids(tok, [w.strip() for w in cfg.refusal_tokens.split(",") if w.strip()])
    text = _text(loaded, prompt, response, cfg)
    ids, probs = _layer_probs(loaded, text, cfg.last_positions)
    top_p, top_i = probs.topk(cfg.top_k, dim=-1)
    p_ref = probs[..., ref].sum(-1)
    layers = []
    for l in range(probs.shape[0]):
        cells = [{"top": _show(tok, top_i[l, t].tolist()), "top_p": top_p[l, t].tolist(),
                  "p_refusal": float(p_ref[l, t])} for t in range(probs.shape[1])]
        layers.append({"layer": l, "cells": cells})
    return {
        "kind": "logit_lens", "model": loaded.info.as_meta(), "prompt": prompt, "response": response, "text": text,
        "n_layers": loaded.info.n_layers, "tokens": _show(tok, ids), "token_ids": ids,
        "refusal_tokens": ref, "settings": cfg.__dict__, "layers": layers,
        "final_p_refusal_last": float(p_ref[-1, -1]),
    }
