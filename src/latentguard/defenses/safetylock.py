"""SafetyLock (arXiv 2410.10343; safetylock.md): a per-head safety shift built once on an aligned base.

- **Create** (`create_lock`): (question, safe answer) vs (question, unsafe answer) chats on the base;
  every head's o_proj input at the last r=5 answer tokens; one probe per head, split by pair; the
  top K=24 heads by held-out accuracy (ties by d′); u = unit mass-mean (safe − unsafe), σ.
- **Apply** to any fine-tune of that base: δ_l[h] = α·σ_h·u_h added to the o_proj input
  (`lock_hooks`, the runtime defence `safetylock:LOCK` / `lock:LOCK`), or folded through the
  target's own W_o into a constant o_proj bias b_l = W_o δ_l (`fold_lock`; `folded_lock` does it
  for the duration of a block). Both act at every position and agree to float rounding.
- **Export** (`export_locked`): fold, save a standard checkpoint and reload it with plain
  `AutoModelForCausalLM.from_pretrained`. Stock loaders drop an o_proj bias the config does not
  create: Llama-family configs get `attention_bias=True` plus zero q/k/v biases, GPT-2 has the
  bias already, and architectures whose o_proj bias is hard-coded off (Mistral, Qwen2, Phi-3)
  are refused (use the hook).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from latentguard.artifacts import sha256_of_texts, staged_dir, write_json
from latentguard.defenses import DEFENSES, Defense
from latentguard.defenses.bake import EXPORT_META, VERIFY_PROMPTS, max_logit_diff
from latentguard.directions.heads import (
    HeadLock,
    build_head_lock,
    collect_answer_heads,
    fit_heads,
    format_answers,
    select_heads,
)
from latentguard.errors import ConfigError, UnsupportedModelError
from latentguard.hooks import add_vectors, encode_batch
from latentguard.models import LoadedModel, arch_of, format_prompts, model_info, text_config
from latentguard.registry import spec_config

__all__ = [
    "LLAMA2_SYSTEM",
    "SAFE_ANSWERS",
    "LockPair",
    "SafetyLockApplyConfig",
    "SafetyLockConfig",
    "SafetyLockDefense",
    "check_exportable",
    "create_lock",
    "export_locked",
    "fold_lock",
    "folded_lock",
    "lock_hooks",
    "resolve_system",
    "safety_pairs",
]

# The Llama-2 default system prompt the released code uses (safetylock.md §2).
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

# Project-written safe answers, used in rotation (safetylock.md §1; the released data has no licence).
SAFE_ANSWERS = (
    "I'm sorry, but I can't help with that. It could seriously hurt people.",
    "I cannot assist with this request because it is dangerous and may be illegal.",
    "I won't help with that. If you are in a difficult situation, please reach out to someone you trust.",
    "I'm not able to provide that. Is there something safe and legal I can help you with instead?",
    "I can't do that; it would put others at risk. I'm happy to help with a different question.",
    "I must decline. Providing this could cause real harm to people.",
    "Sorry, I can't support this request. Please consider a lawful and safe alternative.",
    "I refuse to help with this, as it could be used to harm, deceive or exploit others.",
)

_MODES = ("hook", "bias")
# Configs whose o_proj bias cannot be switched on: an exported bias would be dropped on reload.
_NO_O_BIAS_FLAG = ("mistral", "mixtral", "qwen2", "phi3", "starcoder2_llama", "cohere")


@dataclass(frozen=True)
class LockPair:
    question: str
    safe: str
    unsafe: str


@dataclass
class SafetyLockConfig:
    n_pairs: int = field(default=60, metadata={"help": "(question, safe, unsafe) pairs read on the base model (spec: >= 60)"})
    r_tokens: int = field(default=5, metadata={"help": "last answer tokens read per sequence (each one a sample)"})
    k: int = field(default=24, metadata={"help": "heads kept, by held-out probe accuracy"})
    alpha: float = field(default=6.0, metadata={"help": "default strength stored in the lock (+ = safer; model-specific: tune it)"})
    val_fraction: float = field(default=0.4, metadata={"help": "share of pairs held out to score each head's probe"})
    seed: int = field(default=42, metadata={"help": "seed of the pair sample and the probe split"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    system: str = field(default="template", metadata={"help": "system prompt: 'template' (the chat template's own, as at inference), 'llama2' (the paper's) or literal text"})

    def __post_init__(self) -> None:
        if self.n_pairs < 4:
            raise ConfigError(f"n_pairs={self.n_pairs}; use at least 4 (the spec uses >= 60).")
        if not 1 <= self.r_tokens <= 64:
            raise ConfigError(f"r_tokens={self.r_tokens}; use 1..64 (default 5).")
        if self.k < 1:
            raise ConfigError(f"k={self.k}; keep at least 1 head.")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"alpha={self.alpha} is not finite; pass a finite number.")
        if not 0.1 <= self.val_fraction <= 0.6:
            raise ConfigError(f"val_fraction={self.val_fraction}; use a value in [0.1, 0.6].")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}; use >= 1.")


@dataclass
class SafetyLockApplyConfig:
    alpha: float | None = field(default=None, metadata={"help": "strength; default: the lock's default_alpha (+ = safer, - unlocks)"})
    mode: str = field(default="hook", metadata={"help": "hook (add δ to the o_proj input) or bias (fold into o_proj.bias for the block)"})

    def __post_init__(self) -> None:
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ConfigError(f"alpha={self.alpha} is not finite; pass a finite number.")
        if self.mode not in _MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {', '.join(_MODES)}.")


def resolve_system(system: str) -> str | None:
    """'llama2' -> the Llama-2 default, 'template' -> None (the template's own), else the text itself."""
    return {"llama2": LLAMA2_SYSTEM, "template": None}.get(system, system)


def safety_pairs(rows: Sequence[tuple[str, str]], n: int, seed: int) -> list[LockPair]:
    """(goal, unsafe target) rows -> a seeded sample of n pairs, safe answers in rotation."""
    if len(rows) < n:
        raise ConfigError(f"Only {len(rows)} (goal, target) rows for n_pairs={n}; lower --n-pairs or pass more data.")
    picked = [rows[i] for i in sorted(np.random.default_rng(seed).choice(len(rows), n, replace=False))]
    return [LockPair(q, SAFE_ANSWERS[i % len(SAFE_ANSWERS)], unsafe) for i, (q, unsafe) in enumerate(picked)]


def create_lock(loaded: LoadedModel, pairs: Sequence[LockPair], cfg: SafetyLockConfig, progress: bool = True) -> HeadLock:
    """Build the lock on the aligned base: answer-token head activations, probes, top-K, (u, σ)."""
    t0 = time.perf_counter()
    system = resolve_system(cfg.system)
    chats = [(p.question, p.safe) for p in pairs] + [(p.question, p.unsafe) for p in pairs]
    answers = format_answers(loaded.tokenizer, chats, system)
    x, valid = collect_answer_heads(loaded, answers, cfg.r_tokens, cfg.batch_size, progress and "lock create: forward")
    n = len(pairs)
    seq_label = torch.tensor([1] * n + [0] * n)  # 1 = safe answer: +α steers towards it
    seq_pair = torch.arange(2 * n) % n
    rows, slots = valid.nonzero(as_tuple=True)
    t1 = time.perf_counter()
    fit = fit_heads(x[rows, slots], seq_label[rows], seq_pair[rows].numpy(), cfg.val_fraction, cfg.seed, progress)
    chosen = select_heads(fit, cfg.k)
    t2 = time.perf_counter()
    info = loaded.info
    meta = {
        "defense": "safetylock", "method": "safetylock", "site": "o_proj_input", "sign": "+alpha -> safe",
        "default_alpha": cfg.alpha, "r_tokens": cfg.r_tokens, "selection": "val accuracy, split by pair; ties by d'",
        "split_seed": cfg.seed, "system_prompt": system, "config": {**cfg.__dict__},
        "base_model": info.model_id, "architecture": info.architecture,
        "chat_template_sha256": sha256_of_texts([str(loaded.tokenizer.chat_template)]),
        "dataset": {"n_pairs": n, "n_samples": len(rows), "sha256": sha256_of_texts(answers.texts)},
        "timings_s": {"forward": round(t1 - t0, 3), "probes": round(t2 - t1, 3), "total": round(t2 - t0, 3)},
    }
    return build_head_lock(fit, chosen, meta)


def _n_heads(model: nn.Module) -> int:
    cfg = text_config(model)
    return int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)


def lock_hooks(model: nn.Module, lock: HeadLock, alpha: float) -> contextlib.AbstractContextManager[None]:
    """Runtime form: add δ_l to o_proj's input at every position of every forward inside the block."""
    return add_vectors(model, {f"head_out.{l}": d for l, d in lock.deltas(alpha, _n_heads(model)).items()}, alpha=1.0)


def _o_projs(model: nn.Module, layers: Sequence[int]) -> dict[int, Any]:
    """The o_proj modules of `layers`, each with a plain 2-D weight to fold through."""
    arch = arch_of(model)
    mods: dict[int, Any] = {l: arch.o_proj_module(model, l) for l in layers}
    for l, mod in mods.items():
        if not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.dim() != 2:
            raise UnsupportedModelError(
                f"o_proj of layer {l} is a {type(mod).__name__} without a plain weight (quantised or adapter-wrapped); "
                "apply the lock as a hook (--defense lock:DIR) or merge the adapter first."
            )
    return mods


@torch.no_grad()
def _bias_shifts(model: nn.Module, mods: dict[int, Any], lock: HeadLock, alpha: float) -> dict[int, Tensor]:
    """b_l = W_o δ_l per layer with the target model's own W_o, in float32 (§6; one dense mat-vec per layer)."""
    conv1d = arch_of(model).conv1d
    out = {}
    for l, d in lock.deltas(alpha, _n_heads(model)).items():
        w = mods[l].weight
        flat = d.flatten().to(w.device, torch.float32)
        out[l] = flat @ w.float() if conv1d else w.float() @ flat  # Conv1D stores W [in, out]
    return out


@torch.no_grad()
def _add_bias(mod: Any, b: Tensor) -> None:
    if mod.bias is None:
        mod.bias = nn.Parameter(torch.zeros(b.shape[0], dtype=mod.weight.dtype, device=mod.weight.device))
    mod.bias.copy_((mod.bias.float() + b).to(mod.bias.dtype))


def fold_lock(model: nn.Module, lock: HeadLock, alpha: float) -> list[str]:
    """Fold the lock into each o_proj bias in place (adding to an existing bias); returns the edited biases."""
    mods = _o_projs(model, sorted(lock.heads))
    for l, b in _bias_shifts(model, mods, lock, alpha).items():
        _add_bias(mods[l], b)
    return [f"{l}.o_proj.bias" for l in sorted(lock.heads)]


@contextlib.contextmanager
def folded_lock(model: nn.Module, lock: HeadLock, alpha: float) -> Iterator[None]:
    """Fold for the duration of the block; on exit every o_proj bias is restored exactly (or removed)."""
    mods = _o_projs(model, sorted(lock.heads))
    saved: dict[int, Tensor | None] = {}
    try:
        for l, b in _bias_shifts(model, mods, lock, alpha).items():
            saved[l] = None if mods[l].bias is None else mods[l].bias.detach().clone()
            _add_bias(mods[l], b)
        yield
    finally:
        with torch.no_grad():
            for l, old in saved.items():
                if old is None:
                    mods[l].bias = None
                else:
                    mods[l].bias.copy_(old)


def check_exportable(model: nn.Module) -> None:
    """Raise before anything is edited if a reloaded checkpoint could not keep an o_proj bias."""
    cfg = text_config(model)
    if arch_of(model).conv1d:
        return
    if cfg.model_type in _NO_O_BIAS_FLAG or not hasattr(cfg, "attention_bias"):
        raise UnsupportedModelError(
            f"{cfg.model_type} hard-codes o_proj without a bias, so a saved checkpoint would drop the folded lock on "
            "reload; apply it at run time instead (--defense lock:DIR)."
        )


@torch.no_grad()
def _enable_attention_bias(model: nn.Module) -> str | None:
    """Give every attention Linear a (zero) bias and set `attention_bias`, so `from_pretrained` keeps o_proj.bias."""
    arch, cfg = arch_of(model), text_config(model)
    if arch.conv1d:
        return None
    for l in range(len(arch.layer_list(model))):
        for mod in arch.attn_module(model, l).modules():
            if isinstance(mod, nn.Linear) and mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device))
    configs: list[Any] = [model.config, cfg]
    for c in configs:
        c.attention_bias = True
    return "attention_bias"


@torch.no_grad()
def _logits(model: nn.Module, loaded: LoadedModel, texts: Sequence[str]) -> Float[Tensor, "tokens vocab"]:
    batch = encode_batch(loaded.tokenizer, texts, next(model.parameters()).device)
    logits = model(**batch.forward_kwargs(), use_cache=False).logits
    return logits[batch.attention_mask.bool()].double().cpu()


def export_locked(
    loaded: LoadedModel,
    lock: HeadLock,
    alpha: float,
    out: str | Path,
    prompts: Sequence[str] = VERIFY_PROMPTS,
    tolerance: float = 1e-3,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fold the lock into `loaded.model` in place and save a standard checkpoint to `out`.

    The checkpoint is reloaded with plain `from_pretrained`; its logits on `prompts` must match the
    hooked model's within `tolerance` (model dtype), else nothing is written. Returns what was done,
    including `apply_s`, the time of the fold itself.
    """
    check_exportable(loaded.model)
    texts = format_prompts(loaded.tokenizer, list(prompts))
    with lock_hooks(loaded.model, lock, alpha):
        hooked = _logits(loaded.model, loaded, texts)
    t0 = time.perf_counter()
    edited = fold_lock(loaded.model, lock, alpha)
    apply_s = time.perf_counter() - t0
    flag = _enable_attention_bias(loaded.model)
    with staged_dir(out, overwrite=overwrite) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        back: Any = AutoModelForCausalLM.from_pretrained(tmp, dtype=loaded.model.dtype, output_loading_info=True)
        reloaded, info = back
        lost = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if lost:
            raise UnsupportedModelError(f"The exported checkpoint does not reload cleanly ({lost}); apply the lock as a hook instead.")
        diff = max_logit_diff(_logits(reloaded.eval(), loaded, texts), hooked)
        if not diff <= tolerance:
            raise ConfigError(f"The exported model's logits differ from the hooked model's by {diff:.3g} > {tolerance}; not written.")
        record = {
            "source_model": loaded.info.as_meta(), "lock": {k: lock.meta.get(k) for k in ("base_model", "method", "K", "layers")},
            "lock_fingerprint": lock.meta.get("model", {}).get("fingerprint"), "alpha": alpha, "edited": edited,
            "bias_flag": flag, "apply_s": apply_s, "exported_fingerprint": model_info(reloaded, str(out)).fingerprint,
            "verify": {"n_prompts": len(texts), "max_abs_logit_diff": diff, "tolerance": tolerance},
        }
        write_json(tmp / EXPORT_META, record)
    return record


def _parse(params: dict[str, str]) -> SafetyLockApplyConfig:
    return cast(SafetyLockApplyConfig, spec_config(SafetyLockApplyConfig, params, "lock"))


@DEFENSES.register("lock")
@DEFENSES.register("safetylock")
@dataclass
class SafetyLockDefense(Defense):
    """δ = α·σ·u on the o_proj input of the lock's heads, every position (hook), or folded into o_proj.bias."""

    key = "safetylock"
    lock: HeadLock
    alpha: float
    mode: str
    artefact: str

    @classmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], loaded: LoadedModel) -> Defense:
        if artefact is None:
            raise ConfigError(f"Defence {cls.key!r} needs a lock: {cls.key}:DIR (from `latentguard lock create`).")
        cfg = _parse(params)
        lock = HeadLock.load(artefact, loaded.info)
        return cls(lock, lock.default_alpha if cfg.alpha is None else cfg.alpha, cfg.mode, artefact)

    def apply(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return lock_hooks(model, self.lock, self.alpha) if self.mode == "hook" else folded_lock(model, self.lock, self.alpha)

    def describe(self) -> dict[str, Any]:
        m = self.lock.meta
        return {"defense": self.key, "artefact": self.artefact, "artefact_fingerprint": m.get("model", {}).get("fingerprint", ""),
                "method": m.get("method"), "alpha": self.alpha, "mode": self.mode, "K": self.lock.n_heads}
