"""Sparse autoencoders on one residual site: the model, its artefact, and loaders for public layouts.

One encoder covers the three common activations (SAELens conventions, Gao et al. 2024 for top-k):

    x_in = x / s − b_dec·[apply_b_dec_to_input]          (s: input scale; 1 once folded, and for public SAEs)
    pre  = x_in · W_enc + b_enc                            W_enc [d_in, d_sae]
    c    = relu(pre)                          ("relu", SAELens "standard")
         = relu(pre) · 1[pre > threshold]     ("jumprelu", Gemma Scope)
         = relu(TopK_k(pre))                  ("topk": at most k non-zero, k whenever k pre > 0)
    x̂    = s · (c · W_dec + b_dec)                         W_dec [d_sae, d_in]

Formats read by `load_sae` (all safetensors or npz, never pickle):
- a latentguard `sae` artefact (`latentguard sae train`): `tensors.safetensors` + `meta.json`,
  stamped with the model fingerprint and the tap site;
- a SAELens folder: `cfg.json` + `sae_weights.safetensors` (architectures standard, jumprelu,
  topk; `normalize_activations: none`; the site from `hook_name`, e.g. `blocks.25.hook_resid_post`);
- a bare `.npz` (Gemma Scope `params.npz`) or `.safetensors` file holding W_enc, W_dec, b_enc,
  b_dec and optionally threshold: no metadata, so the caller names the site.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from latentguard.artifacts import Artifact
from latentguard.errors import ArtifactError, ConfigError
from latentguard.hooks import capture, encode_batch
from latentguard.hooks.sites import Site, parse_site
from latentguard.models import LoadedModel, ModelInfo, format_prompts

__all__ = [
    "ARCHITECTURES",
    "SAE_KIND",
    "SAEMeta",
    "SparseAutoencoder",
    "load_sae",
    "pool_codes",
    "pooled_pair_codes",
]

SAE_KIND = "sae"
ARCHITECTURES = ("topk", "relu", "jumprelu")
_SAELENS_ARCH = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_SAELENS_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)$")


@dataclass
class SAEMeta:
    """What an SAE needs besides its weights: where it reads, how it scales, where it came from."""

    site: str
    architecture: str = "topk"
    k: int | None = 32
    input_scale: float = 1.0
    apply_b_dec_to_input: bool = True
    source: str = "latentguard"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"SAE architecture {self.architecture!r}; use one of {', '.join(ARCHITECTURES)}.")
        if self.architecture == "topk" and (self.k is None or self.k < 1):
            raise ConfigError(f"A top-k SAE needs k >= 1, got k={self.k}.")
        if not self.input_scale > 0:
            raise ConfigError(f"input_scale={self.input_scale}; use a positive number.")
        layer = self.site.partition(".")[2]
        if not layer.isdigit():
            raise ConfigError(f"SAE site {self.site!r}; write KIND.LAYER with a layer >= 0 (e.g. 'resid_post.29').")
        self.site = str(parse_site(self.site, int(layer) + 1))


class SparseAutoencoder(nn.Module):
    """A frozen-or-trainable SAE; `encode` keeps the autograd graph to its input (FPO needs it)."""

    threshold: Tensor | None  # JumpReLU only (a buffer)

    def __init__(self, d_in: int, d_sae: int, meta: SAEMeta) -> None:
        super().__init__()
        self.meta = meta
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(d_sae) if meta.architecture == "jumprelu" else None)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def site(self) -> Site:
        kind, _, layer = self.meta.site.partition(".")
        return Site(kind, int(layer))

    def pre_activation(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        x_in = x.to(self.W_enc.dtype) / self.meta.input_scale
        if self.meta.apply_b_dec_to_input:
            x_in = x_in - self.b_dec
        return x_in @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        if self.meta.architecture == "relu":
            return torch.relu(pre)
        if self.meta.architecture == "jumprelu":
            return torch.relu(pre) * (pre > cast(Tensor, self.threshold))
        top = pre.topk(min(int(self.meta.k or 1), pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.activate(self.pre_activation(x))

    def decode(self, c: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return (c @ self.W_dec + self.b_dec) * self.meta.input_scale

    def forward(self, x: Float[Tensor, "... d_in"]) -> tuple[Tensor, Tensor]:
        """(reconstruction x̂, codes c)."""
        c = self.encode(x)
        return self.decode(c), c

    @torch.no_grad()
    def fold_input_scale_(self) -> SparseAutoencoder:
        """The same SAE with s folded in (s·b_enc, s·b_dec, s·threshold, s = 1): codes come out in the
        model's activation units, as public SAEs' do (c' = s·c; relu, top-k and the threshold commute
        with a positive scale), so FPO's D is comparable with theirs. Returns self."""
        s = self.meta.input_scale
        for t in (self.b_enc, self.b_dec, self.threshold):
            if t is not None:
                t.mul_(s)
        self.meta.extra["folded_input_scale"] = s
        self.meta.input_scale = 1.0
        return self

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Unit-norm decoder rows (Gao et al. keep them so during training)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))

    def tensors(self) -> dict[str, Tensor]:
        out = {k: getattr(self, k).detach().float() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.threshold is not None:
            out["threshold"] = self.threshold.detach().float()
        return out

    def to_artifact(self, extra_meta: dict[str, Any] | None = None) -> Artifact:
        m = self.meta
        meta = {"site": m.site, "layer": self.site.layer, "architecture": m.architecture, "k": m.k,
                "input_scale": m.input_scale, "apply_b_dec_to_input": m.apply_b_dec_to_input, "source": m.source,
                "d_in": self.d_in, "d_sae": self.d_sae,
                "hook": "decoder block output before the final norm (hidden_states[l+1] except after the last block)"
                if self.site.kind == "resid_post" else f"latentguard site {m.site}",
                **m.extra, **(extra_meta or {})}
        return Artifact(kind=SAE_KIND, tensors=self.tensors(), meta=meta)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: SAEMeta) -> SparseAutoencoder:
        missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in tensors]
        if missing or (meta.architecture == "jumprelu" and "threshold" not in tensors):
            need = missing or ["threshold"]
            raise ArtifactError(f"SAE weights lack {', '.join(need)} (have {', '.join(sorted(tensors))}); "
                                "pass W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec (and threshold for jumprelu).")
        d_in, d_sae = tensors["W_enc"].shape
        if tuple(tensors["W_dec"].shape) != (d_sae, d_in):
            raise ArtifactError(f"W_dec has shape {tuple(tensors['W_dec'].shape)}, expected {(d_sae, d_in)} "
                                "(W_enc is [d_in, d_sae]); transpose the weights to the SAELens layout.")
        sae = cls(int(d_in), int(d_sae), meta)
        with torch.no_grad():
            for k, v in tensors.items():
                if k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") and getattr(sae, k) is not None:
                    getattr(sae, k).copy_(v.float())
        return sae.requires_grad_(False).eval()


def pool_codes(
    sae: SparseAutoencoder, hidden: Float[Tensor, "batch seq d_in"], mask: Tensor
) -> Float[Tensor, "batch d_sae"]:
    """Mean SAE code over the masked tokens of each row (FPO's c̄); rows without tokens give 0.

    Only the masked tokens are encoded, in float32; the graph to `hidden` is kept.
    """
    keep = mask.to(hidden.device).bool()
    rows = keep.nonzero()[:, 0]
    codes = sae.encode(hidden[keep].float())
    total = codes.new_zeros(hidden.shape[0], codes.shape[-1]).index_add(0, rows, codes)
    return total / keep.sum(1, keepdim=True).clamp(min=1).to(codes.dtype)


@torch.no_grad()
def pooled_pair_codes(loaded: LoadedModel, sae: SparseAutoencoder, pairs: Sequence[tuple[str, str]],
                      batch_size: int = 8) -> Float[Tensor, "n d_sae"]:
    """c̄ per (prompt, response) pair: the mean SAE code over the response tokens, with the prompt
    chat-formatted (the model's default system prompt kept)."""
    tok, model, site = loaded.tokenizer, loaded.model, str(sae.site)
    texts = list(zip(format_prompts(tok, [p for p, _ in pairs]), [r for _, r in pairs]))
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encode_batch(tok, texts[start : start + batch_size], model.device)
        with capture(model, [site]) as rec:
            model(**batch.forward_kwargs(), use_cache=False)
        out.append(pool_codes(sae.to(model.device), rec[site][0].to(model.device), batch.select).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------- loading


def _check_for_model(sae: SparseAutoencoder, path: Path, model: ModelInfo | None) -> None:
    if model is None:
        return
    if sae.d_in != model.d_model:
        raise ArtifactError(f"{path} reads {sae.d_in}-dim activations, this model's hidden size is {model.d_model}; "
                            "use an SAE trained on this model.")
    if not 0 <= sae.site.layer < model.n_layers:
        raise ArtifactError(f"{path} reads layer {sae.site.layer}, this model has {model.n_layers} layers; "
                            "use an SAE trained on this model.")


def _saelens(path: Path) -> SparseAutoencoder:
    cfg = json.loads((path / "cfg.json").read_text())
    arch = _SAELENS_ARCH.get(str(cfg.get("architecture", "standard")))
    if arch is None:
        raise ArtifactError(f"{path}/cfg.json: architecture {cfg.get('architecture')!r} is not supported; "
                            f"latentguard reads {', '.join(_SAELENS_ARCH)}.")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise ArtifactError(f"{path}/cfg.json: normalize_activations={norm!r} is not supported (only 'none'); "
                            "fold the scaling into W_enc/b_enc or use another SAE.")
    hook = str(cfg.get("hook_name") or cfg.get("hook_point") or "")
    m = _SAELENS_HOOK.match(hook)
    if m is None:
        raise ArtifactError(f"{path}/cfg.json: hook {hook!r} is not a residual/MLP/attention output of a block; "
                            "latentguard reads blocks.L.hook_{resid_pre,resid_post,mlp_out,attn_out}.")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    tensors = load_file(str(path / "sae_weights.safetensors"))
    if arch == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    meta = SAEMeta(site=f"{m.group(2)}.{m.group(1)}", architecture=arch, k=int(k) if k else None,
                   apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", arch != "jumprelu")), source="saelens",
                   extra={"saelens_model_name": cfg.get("model_name"), "saelens_hook_name": hook})
    return SparseAutoencoder.from_tensors(tensors, meta)


def _bare(path: Path, site: str | None, architecture: str | None, k: int | None) -> SparseAutoencoder:
    if site is None:
        raise ArtifactError(f"{path} carries no metadata; name the site it was trained on "
                            "(`sae eval --site resid_post.25`, `train --fpo-layer 25`).")
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            tensors = {name: torch.from_numpy(z[name].astype("float32")) for name in z.files}
    else:
        tensors = load_file(str(path))
    arch = architecture or ("jumprelu" if "threshold" in tensors else "topk" if k else "relu")
    # Gemma Scope's JumpReLU encoder does not subtract b_dec from its input.
    return SparseAutoencoder.from_tensors(tensors, SAEMeta(site=site, architecture=arch, k=k,
                                                           apply_b_dec_to_input=arch != "jumprelu", source=path.suffix[1:]))


def load_sae(path: str | Path, model: ModelInfo | None = None, site: str | None = None,
             architecture: str | None = None, k: int | None = None) -> SparseAutoencoder:
    """Load an SAE (latentguard artefact, SAELens folder, or bare npz/safetensors); frozen, eval mode.

    `model` checks it fits (artefacts: the full fingerprint check; others: hidden size and layer).
    `site`, `architecture` and `k` describe a bare weights file, which carries no metadata.
    """
    path = Path(path)
    try:
        if path.is_dir() and (path / "meta.json").is_file():
            art = Artifact.load(path, expect=SAE_KIND, model=model)
            m = art.meta
            sae = SparseAutoencoder.from_tensors(art.tensors, SAEMeta(
                site=m["site"], architecture=m["architecture"], k=m.get("k"), input_scale=float(m["input_scale"]),
                apply_b_dec_to_input=bool(m["apply_b_dec_to_input"]), source=m.get("source", "latentguard"),
                extra={k_: v for k_, v in m.items() if k_ in ("train", "eval", "model", "folded_input_scale")}))
        elif path.is_dir() and (path / "cfg.json").is_file():
            sae = _saelens(path)
        elif path.is_dir() and (path / "params.npz").is_file():
            sae = _bare(path / "params.npz", site, architecture, k)
        elif path.is_file() and path.suffix in (".npz", ".safetensors"):
            sae = _bare(path, site, architecture, k)
        else:
            raise ArtifactError(f"{path} is not an SAE: pass a `latentguard sae train` output, a SAELens folder "
                                "(cfg.json + sae_weights.safetensors), or a .npz / .safetensors weights file.")
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError) as e:
        if isinstance(e, (ArtifactError, ConfigError)):
            raise
        raise ArtifactError(f"SAE at {path} could not be read ({e}); check the files.") from e
    _check_for_model(sae, path, model)
    return sae
