"""Per-head analysis on o_proj inputs, shared by SafetyLock and PAS (safetylock.md §2–5, §7).

- `format_answers` renders (question, answer) chats and locates each answer's tokens exactly
  (never the template tokens around them);
- `collect_answer_heads` reads every head's o_proj input at the last r answer tokens;
- `fit_heads` scores one logistic probe per (layer, head) on a split by pair/item, and computes
  the unit mass-mean direction u (label 1 − label 0), σ = std of the projections on u (ddof 0)
  and the separation d′ = |mean₁·u − mean₀·u| / σ that breaks accuracy ties;
- `HeadLock` holds the top-K heads with (u, σ, score) and saves as an artefact of kind
  `headlock`: tensors `layers.{l}.heads|directions|sigma|score` plus the full score grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from latentguard.artifacts import Artifact
from latentguard.directions.probes import fit_probe
from latentguard.errors import ArtifactError, ConfigError, DataError
from latentguard.hooks import collect
from latentguard.models import LoadedModel, ModelInfo

__all__ = [
    "HEADLOCK_KIND",
    "AnswerTexts",
    "HeadFit",
    "HeadLock",
    "build_head_lock",
    "collect_answer_heads",
    "fit_heads",
    "format_answers",
    "render_chat",
    "select_heads",
    "split_groups",
]

HEADLOCK_KIND = "headlock"
_PLACEHOLDER = "\x00LATENTGUARD_ANSWER\x00"


@dataclass(frozen=True)
class AnswerTexts:
    """Chat-formatted [system, user, assistant] texts and where each answer sits in its tokens."""

    texts: list[str]
    n_prompt: list[int]  # tokens up to and including the assistant header
    n_answer: list[int]  # tokens of the assistant content
    n_suffix: int  # template tokens after the content (end of turn); the same for every text


def _messages(system: str | None, question: str, answer: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": question})
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def render_chat(tok: PreTrainedTokenizerBase, system: str | None, question: str, answer: str | None = None) -> str:
    """[system, user(, assistant)] through the chat template; without an answer, ending in the generation prompt."""
    msgs = _messages(system, question, answer)
    return str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None))


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _suffix_ids(tok: PreTrainedTokenizerBase, system: str | None) -> list[int]:
    rendered = render_chat(tok, system, "Hi.", _PLACEHOLDER)
    if _PLACEHOLDER not in rendered:
        raise ConfigError("The chat template drops the assistant answer; pass --chat-template with one that renders it.")
    return _ids(tok, rendered.split(_PLACEHOLDER, 1)[1])


def format_answers(tok: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], system: str | None) -> AnswerTexts:
    """Render `(question, answer)` chats; the answer is indexed explicitly (safetylock.md §2).

    p = template([sys, user]) with the generation prompt, f = template([sys, user, assistant]);
    f must start with p and end with the template's end-of-turn suffix, and the answer is what lies between.
    """
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"Tokenizer {type(tok).__name__} has no chat template; pass --chat-template FILE.")
    suffix = _suffix_ids(tok, system)
    texts, n_prompt, n_answer = [], [], []
    for question, answer in pairs:
        p = _ids(tok, render_chat(tok, system, question))
        text = render_chat(tok, system, question, answer)
        f = _ids(tok, text)
        if f[: len(p)] != p or (suffix and f[len(f) - len(suffix):] != suffix):
            raise ConfigError(
                f"The chat template does not tokenise the answer to {question[:40]!r} at a stable boundary; "
                "pass --chat-template with a template whose assistant header and end of turn are separate tokens."
            )
        n = len(f) - len(suffix) - len(p)
        if n < 1:
            raise DataError(f"The answer to {question[:40]!r} is empty after templating; give every pair a non-empty answer.")
        texts.append(text)
        n_prompt.append(len(p))
        n_answer.append(n)
    return AnswerTexts(texts, n_prompt, n_answer, len(suffix))


def collect_answer_heads(
    loaded: LoadedModel, answers: AnswerTexts, r: int, batch_size: int = 8, progress: bool | str = True
) -> tuple[Float[Tensor, "n r layers heads head_dim"], Bool[Tensor, "n r"]]:
    """Every head's o_proj input at the last `r` answer tokens, and which of the r slots are answer tokens.

    Slot j holds the token at `end - r + j` (end = first suffix token); slots before the answer are
    masked, so a short answer never contributes template tokens.
    """
    if r < 1:
        raise ConfigError(f"r_tokens={r}; use >= 1.")
    L, s = loaded.info.n_layers, answers.n_suffix
    sites = [f"head_out.{l}" for l in range(L)]
    order = sorted(range(len(answers.texts)), key=lambda i: answers.n_prompt[i] + answers.n_answer[i])  # less padding
    acts = collect(loaded.model, loaded.tokenizer, [answers.texts[i] for i in order], sites,
                   positions=list(range(-(s + r), -s)), batch_size=batch_size, progress=progress)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    x = torch.stack([acts[site] for site in sites], dim=2)[back]
    valid = torch.arange(r)[None, :] >= (r - torch.tensor(answers.n_answer))[:, None]
    return x, valid


def split_groups(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val sample indices with every group (pair or item) wholly on one side."""
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise DataError(f"Only {len(uniq)} pair(s); the probe split needs at least 2.")
    perm = np.random.default_rng(seed).permutation(uniq)
    n_val = min(len(uniq) - 1, max(1, round(val_fraction * len(uniq))))
    val = np.isin(groups, perm[:n_val])
    return np.flatnonzero(~val), np.flatnonzero(val)


@dataclass
class HeadFit:
    """Per-(layer, head) probe scores and mass-mean statistics over all samples."""

    score: Float[Tensor, "layers heads"]  # held-out probe accuracy
    separation: Float[Tensor, "layers heads"]  # d′ along u
    direction: Float[Tensor, "layers heads head_dim"]  # unit mass-mean, label 1 − label 0 (zero if undefined)
    sigma: Float[Tensor, "layers heads"]  # std of the projections on u, both classes, ddof 0
    n_train: int
    n_val: int


def _mass_mean(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u, σ, d′) per head from samples x [S, L, H, hd], in float64 (safetylock.md §5)."""
    x = x.double()
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    norm = diff.norm(dim=-1, keepdim=True)
    u = torch.where(norm > 0, diff / norm.clamp_min(1e-300), torch.zeros_like(diff))
    proj = (x * u).sum(-1)
    sigma = proj.std(0, correction=0)
    gap = (proj[y == 1].mean(0) - proj[y == 0].mean(0)).abs()
    sep = torch.where(sigma > 0, gap / sigma.clamp_min(1e-300), torch.zeros_like(gap))
    return u, sigma, sep


def fit_heads(
    x: Float[Tensor, "samples layers heads head_dim"],
    y: Int[Tensor, " samples"],
    groups: Sequence[int] | np.ndarray,
    val_fraction: float = 0.4,
    seed: int = 42,
    progress: bool = True,
) -> HeadFit:
    """Score one probe per head on a split by group (val accuracy) and compute u, σ, d′ on all samples."""
    if set(y.unique().tolist()) != {0, 1}:
        raise DataError("Head probes need samples of both labels (0 and 1); check the pairs.")
    g = np.asarray(groups)
    train, val = split_groups(g, val_fraction, seed)
    yy = y.numpy().astype(np.int64)
    L, H = x.shape[1], x.shape[2]
    score = torch.zeros(L, H, dtype=torch.float64)
    for l in tqdm(range(L), desc="head probes", unit="layer", disable=not progress):
        xl = x[:, l].double().numpy()
        for h in range(H):
            score[l, h] = fit_probe(xl[:, h], yy, train, val, seed).test_acc
    u, sigma, sep = _mass_mean(x, y)
    return HeadFit(score.float(), sep.float(), u.float(), sigma.float(), len(train), len(val))


def select_heads(fit: HeadFit, k: int) -> list[tuple[int, int]]:
    """Top-k (layer, head) by held-out accuracy, ties by d′ then position; heads without a direction never win."""
    L, H = fit.score.shape
    if not 1 <= k <= L * H:
        raise ConfigError(f"k={k}; choose between 1 and the model's {L * H} heads.")
    usable = [(l, h) for l in range(L) for h in range(H) if float(fit.sigma[l, h]) > 0]
    if len(usable) < k:
        raise DataError(f"Only {len(usable)} heads separate the two answer sets at all; lower k to <= {len(usable)}.")
    ranked = sorted(usable, key=lambda lh: (-float(fit.score[lh]), -float(fit.separation[lh]), lh))
    return sorted(ranked[:k])


@dataclass
class HeadLock:
    """Kept heads per layer with unit direction u, σ and probe score; δ_l[h] = α·σ_h·u_h (safetylock.md §6)."""

    heads: dict[int, Int[Tensor, " k"]]
    directions: dict[int, Float[Tensor, "k head_dim"]]
    sigma: dict[int, Float[Tensor, " k"]]
    score: dict[int, Float[Tensor, " k"]]
    meta: dict[str, Any] = field(default_factory=dict)
    grids: dict[str, Tensor] = field(default_factory=dict)  # full [L, H] score / separation

    @property
    def default_alpha(self) -> float:
        return float(self.meta["default_alpha"])

    @property
    def n_heads(self) -> int:
        return sum(len(v) for v in self.heads.values())

    def deltas(self, alpha: float, n_heads: int) -> dict[int, Float[Tensor, "heads head_dim"]]:
        """Per layer, the [n_heads, head_dim] shift of the o_proj input (zero rows for other heads)."""
        out = {}
        for l, idx in self.heads.items():
            d = torch.zeros(n_heads, self.directions[l].shape[1], dtype=torch.float64)
            d[idx] = alpha * self.sigma[l].double()[:, None] * self.directions[l].double()
            out[l] = d
        return out

    def to_artifact(self) -> Artifact:
        tensors: dict[str, Tensor] = {f"grid.{k}": v for k, v in self.grids.items()}
        for l in self.heads:
            tensors |= {f"layers.{l}.heads": self.heads[l], f"layers.{l}.directions": self.directions[l],
                        f"layers.{l}.sigma": self.sigma[l], f"layers.{l}.score": self.score[l]}
        return Artifact(HEADLOCK_KIND, tensors, dict(self.meta))

    def save(self, path: str | Path, info: ModelInfo) -> Path:
        return self.to_artifact().save(path, model=info)

    @classmethod
    def load(cls, path: str | Path, info: ModelInfo | None = None) -> HeadLock:
        """Load a lock; refuses another architecture or shape, warns on a fingerprint mismatch (a fine-tune)."""
        art = Artifact.load(path, expect=HEADLOCK_KIND, model=info, allow_fingerprint_mismatch=True)
        return cls.from_artifact(art, str(path))

    @classmethod
    def from_artifact(cls, art: Artifact, where: str = "lock") -> HeadLock:
        t = art.tensors
        layers = sorted({int(k.split(".")[1]) for k in t if k.startswith("layers.")})
        try:
            lock = cls({l: t[f"layers.{l}.heads"].long() for l in layers},
                       {l: t[f"layers.{l}.directions"].float() for l in layers},
                       {l: t[f"layers.{l}.sigma"].float() for l in layers},
                       {l: t[f"layers.{l}.score"].float() for l in layers},
                       art.meta, {k[5:]: v for k, v in t.items() if k.startswith("grid.")})
        except KeyError as e:
            raise ArtifactError(f"{where} lacks tensor {e}; recreate it with `latentguard lock create`.") from e
        if "default_alpha" not in art.meta or not all(torch.isfinite(v).all() for v in lock.directions.values()):
            raise ArtifactError(f"{where} has no default_alpha or non-finite directions; recreate it.")
        return lock


def build_head_lock(fit: HeadFit, chosen: Sequence[tuple[int, int]], meta: dict[str, Any]) -> HeadLock:
    """Group the chosen (layer, head) pairs by layer and take their u, σ and score from `fit`."""
    by_layer: dict[int, list[int]] = {}
    for l, h in sorted(chosen):
        by_layer.setdefault(l, []).append(h)
    idx = {l: torch.tensor(hs, dtype=torch.int64) for l, hs in by_layer.items()}
    return HeadLock(
        heads=idx,
        directions={l: fit.direction[l, i].clone() for l, i in idx.items()},
        sigma={l: fit.sigma[l, i].clone() for l, i in idx.items()},
        score={l: fit.score[l, i].clone() for l, i in idx.items()},
        meta={**meta, "K": len(chosen), "layers": sorted(idx), "n_train": fit.n_train, "n_val": fit.n_val},
        grids={"score": fit.score.clone(), "separation": fit.separation.clone(), "sigma": fit.sigma.clone()},
    )
