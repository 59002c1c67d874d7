"""Inherent response tendency: how much a model "wants" to affirm rather than refuse an instruction.

radial.md §2 (the paper's equations are lost; this is the spec's reconstruction). For an
instruction X (chat-formatted, with the generation header) and a response y tokenised alone and
appended:

    log p(y|X)  = Σ_i log P(y_i | X, y_<i)                    teacher-forced, log-softmax in fp32
    log p*(y|X) = Σ_i log max_v P(v | X, y_<i)                 the model's own top token per step
    ρ(y|X)      = exp((log p − log p*) / n_norm)               n_norm = |y| (norm=token) or 1 (none)
    T_a = mean_k ρ(y_a^k | X),  T_r = mean_k ρ(y_r^k | X),  score = T_a / T_r (or T_a − T_r)

`pstar=greedy_path` replaces log p* by the log-probability of the model's own free-running greedy
output of the same length (EOS suppressed), so ρ may exceed 1 there.

Cost (§2): the prompt runs once with a KV cache that is repeated for all 40 responses, which are
scored in padded batches; `shared_cache=False` runs every (prompt, response) pair in full and
gives the same numbers within 1e-4 (tests/attacks/test_radial.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from latentguard.errors import ConfigError
from latentguard.hooks import encode_batch
from latentguard.models import LoadedModel

__all__ = ["PSTAR", "TendencyRows", "distribution", "score_tendency", "tendency_scores"]

PSTAR = ("teacher_forced", "greedy_path")
_WS_MARKS = ("Ġ", "▁", " ", "\n", "Ċ")
TOP_CUTOFF, BOTTOM_CUTOFF = 1.1, 0.6  # radial.md §3 / paper §5.2


@dataclass
class TendencyRows:
    """Per (instruction, response): teacher-forced log p, log p* and the response length in tokens."""

    logp: Float[Tensor, "n r"]
    logp_star: Float[Tensor, "n r"]
    n_tokens: Int[Tensor, "n r"]


def _leading_ws(tok: PreTrainedTokenizerBase, token_id: int) -> bool:
    piece = str(tok.convert_ids_to_tokens(int(token_id)) or "")
    return piece.startswith(_WS_MARKS) or str(tok.decode([int(token_id)])).startswith((" ", "\n"))


class _ResponseIds:
    """Each response tokenised alone (no special tokens, no EOS), plain and with one leading space.

    Pitfall 2: the first response token must follow the whitespace convention of the model's own
    greedy first token, so each instruction picks the variant that matches it.
    """

    def __init__(self, tok: PreTrainedTokenizerBase, responses: Sequence[str]) -> None:
        self.tok = tok
        self.variants = [[list(tok(v, add_special_tokens=False)["input_ids"]) for v in (r, " " + r)] for r in responses]
        if any(not v[0] for v in self.variants):
            raise ConfigError("A tendency response tokenised to zero tokens; use non-empty responses.")
        self.ws = [[_leading_ws(tok, v[0][0]), _leading_ws(tok, v[1][0])] for v in self.variants]
        self.max_len = max(len(x) for v in self.variants for x in v)

    def for_greedy(self, first_token: int) -> list[list[int]]:
        want = _leading_ws(self.tok, first_token)
        return [v[0] if w[0] == want else v[1] if w[1] == want else v[0] for v, w in zip(self.variants, self.ws)]


def _sums(lp: Float[Tensor, "n l v"], ids: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(Σ log P(y_i), Σ max log P, n) per row from next-token log-probs aligned with `ids`."""
    width = lp.shape[1]
    y = torch.tensor([r + [0] * (width - len(r)) for r in ids], device=lp.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], device=lp.device, dtype=torch.float64)
    tok_lp = lp.gather(-1, y[..., None]).squeeze(-1).double()
    max_lp = lp.max(-1).values.double()
    return (tok_lp * mask).sum(-1).cpu(), (max_lp * mask).sum(-1).cpu(), mask.sum(-1).long().cpu()


def _shared_chunk(loaded: LoadedModel, cache: Any, plen: Tensor, pmask: Tensor, last_lp: Tensor,
                  rows: list[int], ids: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Score responses continuing the cached prompts `rows` (indices into the prompt batch)."""
    device = pmask.device
    width = max(map(len, ids))
    pad = loaded.tokenizer.pad_token_id or 0
    idx = torch.tensor(rows, device=device)
    c = copy.deepcopy(cache)
    c.reorder_cache(idx)
    resp = torch.tensor([r + [pad] * (width - len(r)) for r in ids], device=device)
    mask = torch.cat([pmask[idx], torch.ones(len(rows), width, dtype=pmask.dtype, device=device)], dim=1)
    pos = plen[idx, None] + torch.arange(width, device=device)[None]
    logits = loaded.model(input_ids=resp, attention_mask=mask, position_ids=pos, cache=c).logits
    lp = torch.cat([last_lp[idx, None], logits[:, :-1].float().log_softmax(-1)], dim=1)
    return _sums(lp, ids)


def _full_chunk(loaded: LoadedModel, prompt_ids: list[list[int]], ids: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Reference path: each (prompt, response) pair in one full forward, no cache."""
    device = next(loaded.model.parameters()).device
    seqs = [p + r for p, r in zip(prompt_ids, ids)]
    width = max(map(len, seqs))
    pad = loaded.tokenizer.pad_token_id or 0
    inp = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    att = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    lp = loaded.model(input_ids=inp, attention_mask=att, position_ids=pos).logits.float().log_softmax(-1)
    sel = lp.new_zeros(len(ids), max(map(len, ids)), lp.shape[-1])
    for b, r in enumerate(ids):  # response token i is predicted at position width - len(r) - 1 + i
        sel[b, : len(r)] = lp[b, width - len(r) - 1 : width - 1]
    return _sums(sel, ids)


def _greedy_path(loaded: LoadedModel, enc: Any, length: int) -> Float[Tensor, "b l"]:
    """Cumulative log-prob of the model's own greedy continuation (EOS suppressed), per step."""
    tok = loaded.tokenizer
    out = loaded.model.generate(  # type: ignore[operator]
        **enc.forward_kwargs(), max_new_tokens=length, min_new_tokens=length, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    chosen = out.sequences[:, -length:]
    lps = torch.stack([lg.float().log_softmax(-1).gather(-1, chosen[:, j, None]).squeeze(-1)
                       for j, lg in enumerate(out.logits)], dim=1)
    return lps.double().cumsum(-1).cpu()


@torch.no_grad()
def score_tendency(
    loaded: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 8,
    rows: int = 40,
    shared_cache: bool = True,
    pstar: str = "teacher_forced",
    progress: bool = True,
) -> TendencyRows:
    """Teacher-forced log p and log p* of every response after every formatted prompt.

    Args:
        prompts: chat-formatted instructions ending with the generation header.
        batch_size: prompts per forward; rows: response rows per scoring forward.
    """
    if pstar not in PSTAR:
        raise ConfigError(f"pstar={pstar!r}; use one of {', '.join(PSTAR)}.")
    if not prompts:
        raise ConfigError("No instructions to score; pass at least one.")
    tok = loaded.tokenizer
    resp = _ResponseIds(tok, responses)
    device = next(loaded.model.parameters()).device
    out_lp, out_star, out_n = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="tendency", unit="batch", disable=not progress):
        enc = encode_batch(tok, list(prompts[start : start + batch_size]), device)
        res = loaded.model(**enc.forward_kwargs(), use_cache=shared_cache, logits_to_keep=1)
        last_lp = res.logits[:, -1].float().log_softmax(-1)
        plen = enc.attention_mask.sum(-1)
        per_row = [resp.for_greedy(int(t)) for t in last_lp.argmax(-1)]
        pairs = [(b, ids) for b, r_ids in enumerate(per_row) for ids in r_ids]
        sums = []
        for c0 in range(0, len(pairs), rows):
            chunk = pairs[c0 : c0 + rows]
            if shared_cache:
                sums.append(_shared_chunk(loaded, res.cache, plen, enc.attention_mask, last_lp,
                                          [b for b, _ in chunk], [i for _, i in chunk]))
            else:
                p_ids = [enc.input_ids[b, -int(plen[b]):].tolist() for b, _ in chunk]
                sums.append(_full_chunk(loaded, p_ids, [i for _, i in chunk]))
        lp, star, n = (torch.cat([s[k] for s in sums]).view(len(per_row), len(responses)) for k in range(3))
        if pstar == "greedy_path":
            path = _greedy_path(loaded, enc, resp.max_len)
            star = path.gather(1, (n - 1).clamp(min=0))
        out_lp.append(lp)
        out_star.append(star)
        out_n.append(n)
    return TendencyRows(torch.cat(out_lp), torch.cat(out_star), torch.cat(out_n))


def tendency_scores(rows: TendencyRows, n_affirm: int, norm: str = "token", combine: str = "ratio") -> dict[str, Tensor]:
    """score, log T_a, log T_r per instruction (float64), computed in log space (pitfall 4)."""
    if norm not in ("token", "none") or combine not in ("ratio", "diff"):
        raise ConfigError(f"norm={norm!r}, combine={combine!r}; use norm token|none and combine ratio|diff.")
    log_rho = rows.logp - rows.logp_star
    if norm == "token":
        log_rho = log_rho / rows.n_tokens.clamp(min=1).double()
    n_rej = log_rho.shape[1] - n_affirm
    log_ta = torch.logsumexp(log_rho[:, :n_affirm], -1) - math.log(n_affirm)
    log_tr = torch.logsumexp(log_rho[:, n_affirm:], -1) - math.log(n_rej)
    score = (log_ta - log_tr).exp() if combine == "ratio" else log_ta.exp() - log_tr.exp()
    return {"score": score, "log_ta": log_ta, "log_tr": log_tr}


def distribution(score: Tensor, combine: str = "ratio") -> dict[str, Any]:
    """Mean, sd and the shares beyond the paper's cut-offs (≥ 1.1, ≤ 0.6); quantile sets when they misfire."""
    s = score.double()
    top, bottom = float((s >= TOP_CUTOFF).double().mean()), float((s <= BOTTOM_CUTOFF).double().mean())
    out: dict[str, Any] = {
        "n": int(s.numel()), "mean": float(s.mean()), "sd": float(s.std()) if s.numel() > 1 else 0.0,
        "min": float(s.min()), "max": float(s.max()),
        "share_ge_1.1": top, "share_le_0.6": bottom,
    }
    if combine == "ratio":
        out["use_quantile_sets"] = any(x < 0.01 or x > 0.40 for x in (top, bottom))
    return out
