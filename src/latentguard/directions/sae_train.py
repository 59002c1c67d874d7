"""Train a small sparse autoencoder on tap activations, streamed through shards on disk.

1. `write_shards`: forward (prompt, response) pairs through the model, keep the response tokens'
   activations at the site (never the first position, whose massive norm distorts training),
   and write them in float16 shards of `shard_tokens` rows; a killed run resumes at the last shard.
2. `train_sae`: Adam on MSE in the input-scaled space (E‖x/s‖² = d), decoder rows kept at unit
   norm, AuxK on dead latents for top-k (Gao et al. 2024, arXiv 2406.04093), L1 for ReLU; the
   shards are streamed in a seeded order each epoch, one shard in memory at a time. The returned
   SAE has s folded in: its codes are in the model's activation units, like public SAEs'.
3. `evaluate_sae`: held-out fraction of variance unexplained, L0, dead latents; `splice_ce`:
   response-token cross-entropy with x̂ spliced in at the site, minus the clean one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from latentguard.artifacts import sha256_of_texts, write_json
from latentguard.directions.sae import SAEMeta, SparseAutoencoder
from latentguard.errors import ConfigError, DataError, OutputExistsError
from latentguard.hooks import collect, edit, encode_batch
from latentguard.hooks.sites import parse_site
from latentguard.models import LoadedModel, format_prompts

__all__ = ["SAETrainConfig", "build_sae", "evaluate_sae", "splice_ce", "train_sae", "write_shards"]

ACTIVATIONS_DIR = "activations"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class SAETrainConfig:
    layer: int = field(default=-1, metadata=_h("decoder layer; the SAE reads resid_post.LAYER (block output, pre-norm)"))
    architecture: str = field(default="topk", metadata=_h("topk or relu"))
    width: int | None = field(default=None, metadata=_h("latents m (default 8 x hidden size)"))
    k: int = field(default=32, metadata=_h("active latents per token (topk)"))
    l1_coeff: float = field(default=3e-3, metadata=_h("L1 weight on the codes (relu)"))
    auxk_coeff: float = field(default=1 / 32, metadata=_h("AuxK weight on dead latents (topk; 0 = off)"))
    lr: float | None = field(default=None, metadata=_h("Adam learning rate (default 2e-4 * sqrt(16384 / m))"))
    batch_tokens: int = field(default=1024, metadata=_h("tokens per optimiser step"))
    epochs: int = field(default=3, metadata=_h("passes over the collected tokens"))
    max_tokens: int = field(default=200_000, metadata=_h("activation tokens to collect (train + held-out)"))
    heldout_fraction: float = field(default=0.1, metadata=_h("share of pairs kept for the held-out FVU"))
    shard_tokens: int = field(default=16_384, metadata=_h("tokens per activation shard on disk"))
    dead_window: int = field(default=100_000, metadata=_h("a latent inactive this many tokens counts as dead"))
    batch_size: int = field(default=16, metadata=_h("pairs per model forward"))
    splice_pairs: int = field(default=32, metadata=_h("held-out pairs for the spliced cross-entropy check (0 = skip)"))
    seed: int = field(default=0, metadata=_h("seed of the held-out split, shard order and init"))

    def __post_init__(self) -> None:
        if self.architecture not in ("topk", "relu"):
            raise ConfigError(f"architecture={self.architecture!r}; train 'topk' or 'relu' (jumprelu SAEs load only).")
        if min(self.k, self.batch_tokens, self.epochs, self.max_tokens, self.shard_tokens, self.batch_size) < 1:
            raise ConfigError("k, batch_tokens, epochs, max_tokens, shard_tokens and batch_size must be >= 1.")
        if self.width is not None and self.width <= self.k:
            raise ConfigError(f"width={self.width} must exceed k={self.k}.")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction={self.heldout_fraction}; use a value in (0, 1).")

    def learning_rate(self, width: int) -> float:
        return self.lr if self.lr is not None else 2e-4 * math.sqrt(16384 / width)


# ---------------------------------------------------------------- activations


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def write_shards(loaded: LoadedModel, pairs: list[tuple[str, str]], site: str, folder: Path,
                 max_tokens: int, shard_tokens: int, batch_size: int = 16,
                 log: Callable[[str], None] = lambda m: None) -> list[Path]:
    """Response-token activations of chat-formatted pairs at `site`, as float16 shards (resumable:
    shards of the same site and pairs are kept, anything else in `folder` is cleared first)."""
    key = {"site": site, "pairs_sha256": sha256_of_texts([t for p in pairs for t in p])}
    state = folder / "state.json"
    if state.is_file() and {k: json.loads(state.read_text()).get(k) for k in key} != key:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = _shards(folder)
    start = json.loads(state.read_text())["pairs_done"] if done else 0
    tokens = sum(load_file(str(p))["x"].shape[0] for p in done)
    prompts = format_prompts(loaded.tokenizer, [p for p, _ in pairs])
    texts = list(zip(prompts, [r for _, r in pairs]))
    buf: list[Tensor] = []
    i = start
    while i < len(texts) and tokens < max_tokens:
        chunk = texts[i : i + batch_size]
        acts = collect(loaded.model, loaded.tokenizer, chunk, [site], positions="response_tokens",
                       batch_size=batch_size, progress=False)[site]
        buf.append(acts[: max_tokens - tokens].half())
        tokens += len(buf[-1])
        i += len(chunk)
        if sum(len(b) for b in buf) >= shard_tokens or i >= len(texts) or tokens >= max_tokens:
            save_file({"x": torch.cat(buf).contiguous()}, str(folder / f"shard-{len(done):05d}.safetensors"))
            done.append(folder / f"shard-{len(done):05d}.safetensors")
            write_json(state, {**key, "pairs_done": i, "tokens": tokens})
            buf = []
            log(f"[sae] {folder.name}: {tokens} tokens from {i} pairs")
    if tokens == 0:
        raise DataError(f"No response tokens collected from {len(texts)} pairs; pass pairs with non-empty responses.")
    return done


def _stream(shards: list[Path], batch_tokens: int, rng: random.Random | None) -> Iterator[Tensor]:
    """Float32 batches; shards in `rng` order, rows shuffled within a shard (None: file order)."""
    order = list(shards)
    if rng is not None:
        rng.shuffle(order)
    rest: Tensor | None = None
    for path in order:
        x = load_file(str(path))["x"].float()
        if rng is not None:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(rng.randrange(2**31)))]
        if rest is not None:
            x = torch.cat([rest, x])
        n = len(x) // batch_tokens * batch_tokens
        if n:  # split() of an empty tensor still yields one (empty) piece
            yield from x[:n].split(batch_tokens)
        rest = x[n:] if n < len(x) else None
    if rest is not None and len(rest):
        yield rest


# ---------------------------------------------------------------- training


def _init_sae(first: Tensor, site: str, cfg: SAETrainConfig, width: int) -> SparseAutoencoder:
    """Input scale so that E‖x/s‖² = d; b_dec = data mean; W_enc = W_decᵀ with unit decoder rows."""
    d = first.shape[1]
    scale = float((first.pow(2).sum(1).mean() / d).sqrt())
    meta = SAEMeta(site=site, architecture=cfg.architecture, k=cfg.k if cfg.architecture == "topk" else None,
                   input_scale=scale)
    sae = SparseAutoencoder(d, width, meta)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(width, d, generator=g))
        sae.normalize_decoder_()
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_((first / scale).mean(0))
    return sae


def _auxk(sae: SparseAutoencoder, x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor) -> Tensor:
    """AuxK: the top-k_aux dead latents reconstruct the residual (Gao et al. §A.2), in scaled space."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k_aux = min(x.shape[1] // 2, n_dead)
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    top = masked.topk(k_aux, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    resid = (x - x_hat).detach() / sae.meta.input_scale
    return (codes @ sae.W_dec - resid).pow(2).sum(-1).mean() / resid.pow(2).sum(-1).mean().clamp(min=1e-8)


def train_sae(shards: list[Path], site: str, cfg: SAETrainConfig,
              log: Callable[[str], None] = lambda m: None) -> tuple[SparseAutoencoder, list[dict[str, float]]]:
    """Fit an SAE on the shards; returns it (frozen) and a per-epoch history of the training loss."""
    torch.manual_seed(cfg.seed)
    first = load_file(str(shards[0]))["x"].float()
    width = cfg.width or 8 * first.shape[1]
    sae = _init_sae(first, site, cfg, width).train().requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate(width))
    since_active = torch.zeros(width)
    history, rng = [], random.Random(cfg.seed)
    for epoch in range(cfg.epochs):
        total, n = 0.0, 0
        for x in _stream(shards, cfg.batch_tokens, rng):
            pre = sae.pre_activation(x)
            c = sae.activate(pre)
            x_hat = sae.decode(c)
            mse = (x - x_hat).pow(2).sum(-1).mean() / (sae.meta.input_scale**2 * x.shape[1])
            loss = mse
            if cfg.architecture == "relu":
                loss = loss + cfg.l1_coeff * c.sum(-1).mean()
            elif cfg.auxk_coeff > 0:
                loss = loss + cfg.auxk_coeff * _auxk(sae, x, x_hat, pre, since_active >= cfg.dead_window)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sae.normalize_decoder_()
            since_active += len(x)
            since_active[(c > 0).any(0).detach()] = 0
            total, n = total + float(mse.detach()) * len(x), n + len(x)
        history.append({"epoch": epoch + 1, "mse_per_dim": total / max(n, 1), "tokens": n})
        log(f"[sae] epoch {epoch + 1}/{cfg.epochs}: scaled MSE/dim {total / max(n, 1):.4f} over {n} tokens")
    return sae.fold_input_scale_().requires_grad_(False).eval(), history


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, shards: list[Path], max_tokens: int = 100_000,
                 batch_tokens: int = 4096) -> dict[str, float]:
    """FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², mean L0, and the share of latents never active, over ≤ max_tokens."""
    err = l0 = 0.0
    n = 0
    s = s2 = None
    active = torch.zeros(sae.d_sae, dtype=torch.bool)
    for x in _stream(shards, batch_tokens, None):
        x = x[: max_tokens - n]
        x_hat, c = sae(x)
        err += float((x - x_hat).pow(2).sum())
        s = x.sum(0) if s is None else s + x.sum(0)
        s2 = x.pow(2).sum() if s2 is None else s2 + x.pow(2).sum()
        l0 += float((c > 0).sum())
        active |= (c > 0).any(0)
        n += len(x)
        if n >= max_tokens:
            break
    if n == 0 or s is None or s2 is None:
        raise DataError("No activation tokens to evaluate the SAE on.")
    var = float(s2) - float(s.pow(2).sum()) / n
    return {"fvu": err / var, "mse": err / (n * sae.d_in), "l0": l0 / n,
            "dead_fraction": 1 - float(active.float().mean()), "tokens": n}


@torch.no_grad()
def splice_ce(loaded: LoadedModel, sae: SparseAutoencoder, pairs: list[tuple[str, str]],
              batch_size: int = 8) -> dict[str, float]:
    """Response-token cross-entropy (nats/token), clean and with x̂ spliced in at the SAE's site."""
    tok, model = loaded.tokenizer, loaded.model
    site = str(sae.site)
    texts = list(zip(format_prompts(tok, [p for p, _ in pairs]), [r for _, r in pairs]))
    sums = {"clean": 0.0, "spliced": 0.0}
    n = 0
    for start in range(0, len(texts), batch_size):
        batch = encode_batch(tok, texts[start : start + batch_size], model.device)
        sel = batch.select.bool()

        def splice(x: Tensor, sel: Tensor = sel) -> Tensor:
            return torch.where(sel.unsqueeze(-1), sae(x.float())[0].to(x.dtype), x)

        target = batch.input_ids[:, 1:]
        mask = sel[:, 1:]
        for key in sums:
            with edit(model, {site: splice} if key == "spliced" else {}):
                logits = model(**batch.forward_kwargs(), use_cache=False).logits[:, :-1]
            sums[key] += float(torch.nn.functional.cross_entropy(logits[mask].float(), target[mask], reduction="sum"))
        n += int(mask.sum())
    clean, spliced = sums["clean"] / n, sums["spliced"] / n
    return {"ce_clean": clean, "ce_spliced": spliced, "ce_increase": spliced - clean, "tokens": n}


# ---------------------------------------------------------------- job


def build_sae(loaded: LoadedModel, pairs: list[tuple[str, str]], cfg: SAETrainConfig, out: str | Path,
              overwrite: bool = False, log: Callable[[str], None] = lambda m: None) -> Path:
    """Collect (resumable), train, evaluate and save an `sae` artefact in `out`; returns `out`."""
    out = Path(out)
    if (out / "meta.json").exists():
        if not overwrite:
            raise OutputExistsError(f"{out} already holds an SAE; pass --overwrite or another --out.")
        shutil.rmtree(out)
    site = str(parse_site(f"resid_post.{cfg.layer}", loaded.info.n_layers))
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    n_held = max(1, round(len(pairs) * cfg.heldout_fraction))
    if len(pairs) - n_held < 1:
        raise DataError(f"{len(pairs)} pairs are too few for a held-out split; pass more data.")
    held = [pairs[i] for i in order[:n_held]]
    train = [pairs[i] for i in order[n_held:]]
    acts = out / ACTIVATIONS_DIR
    budget = int(cfg.max_tokens * (1 - cfg.heldout_fraction))
    train_shards = write_shards(loaded, train, site, acts / "train", budget, cfg.shard_tokens, cfg.batch_size, log)
    held_shards = write_shards(loaded, held, site, acts / "heldout", cfg.max_tokens - budget, cfg.shard_tokens,
                               cfg.batch_size, log)
    sae, history = train_sae(train_shards, site, cfg, log)
    stats = {"heldout": evaluate_sae(sae, held_shards), "train": evaluate_sae(sae, train_shards, cfg.dead_window)}
    if cfg.splice_pairs:
        stats["splice"] = splice_ce(loaded, sae, held[: cfg.splice_pairs], cfg.batch_size)
    log(f"[sae] held-out FVU {stats['heldout']['fvu']:.3f}, L0 {stats['heldout']['l0']:.1f}, "
        f"dead {stats['train']['dead_fraction']:.1%} over {stats['train']['tokens']} training tokens")
    meta: dict[str, Any] = {"train": {"config": asdict(cfg), "history": history, "lr": cfg.learning_rate(sae.d_sae),
                                      "pairs": len(train), "heldout_pairs": len(held),
                                      "data_sha256": sha256_of_texts([t for p in pairs for t in p])},
                            "eval": stats}
    sae.to_artifact(meta).save(out, model=loaded.info)
    shutil.rmtree(acts, ignore_errors=True)
    return out
