"""`fpo`: feature-level constrained preference optimisation (arXiv 2411.07618; spec fpo.md).

    u = β·(ā_θ(y_w) − ā_θ(y_l)) − γ_ref                 ā: mean response-token log-prob
    u ← u − α·β·(D(x, y_l) − sg[D(x, y_w)])             Eq. 9–11, stop-gradient on the chosen side
    L = −log σ(u)
    D(x, y) = (1/|I|) Σ_{i∈I} (c̄_θ,i − c̄_ref,i)²,    I = topk_k(c̄_θ) ∪ topk_k(c̄_ref)

c̄ is the mean over response tokens of the SAE code of the residual at the SAE's site, read live
from trl's own forward. γ_ref (trl's precomputed reference log-probs, length-normalised) and c̄_ref
(one reference pass before training, cached in DIR/method/) are computed once; no reference model
runs during training. With α = 0 this is trl's `sigmoid_norm` loss with precomputed reference
log-probs, exactly. Choices the paper leaves open (spec §1): divisor 1/|I|; pooling over the
response length (not the padded length); the union, not the policy's top-k alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from latentguard.artifacts import Artifact
from latentguard.directions.sae import SparseAutoencoder, load_sae, pool_codes
from latentguard.errors import ArtifactError, ConfigError
from latentguard.models import LoadedModel, normalize_layer
from latentguard.training.capture import capture_live
from latentguard.training.config import PreferenceConfig
from latentguard.training.losses import LOSSES
from latentguard.training.methods.registry import METHODS
from latentguard.training.preference import PreferenceBatch, PreferenceMethod
from latentguard.training.trainer import _INDEX, tapped_model

__all__ = ["FPOConfig", "FPOMethod", "feature_drift", "fpo_loss", "union_topk"]

REFERENCE_KIND = "fpo_reference"
_STORAGE = ("full", "topk")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class FPOConfig(PreferenceConfig):
    """FPO on trl's DPOConfig; `loss_type` is sigmoid_norm and reference log-probs are precomputed."""

    method: str = field(default="fpo", metadata=_h("training method (latentguard list methods)"))
    fpo_sae: str | None = field(default=None, metadata=_h(
        "SAE: a `latentguard sae train` output, a SAELens folder, or a .npz/.safetensors weights file"))
    fpo_layer: int | None = field(default=None, metadata=_h(
        "layer of the SAE's site (default: the SAE's own; a bare weights file reads resid_post.LAYER)"))
    fpo_alpha: float = field(default=0.5, metadata=_h("weight α of the feature constraint (0 = length-normalised DPO)"))
    fpo_k: int = field(default=50, metadata=_h("top-k latents per side in the union I"))
    fpo_ref_storage: str = field(default="full", metadata=_h("cached reference features: full vectors or top-k lists"))
    fpo_ref_topk: int = field(default=256, metadata=_h("latents kept per response with --fpo-ref-storage topk"))

    def __post_init__(self) -> None:
        loss = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss not in (["sigmoid"], ["sigmoid_norm"]):
            raise ConfigError(f"loss_type={loss}; FPO is the sigmoid_norm loss plus its feature term, leave loss_type unset.")
        self.loss_type = ["sigmoid_norm"]
        self.precompute_ref_log_probs = True  # γ_ref is cached offline (spec §1)
        super().__post_init__()
        if not self.fpo_sae:
            raise ConfigError("FPO needs an SAE; pass --fpo-sae DIR (`latentguard sae train` makes one).")
        if self.fpo_alpha < 0 or self.fpo_k < 1:
            raise ConfigError(f"fpo_alpha={self.fpo_alpha}, fpo_k={self.fpo_k}; use alpha >= 0 and k >= 1.")
        if self.fpo_ref_storage not in _STORAGE or self.fpo_ref_topk < self.fpo_k:
            raise ConfigError(f"fpo_ref_storage={self.fpo_ref_storage!r}, fpo_ref_topk={self.fpo_ref_topk}; use one of "
                              f"{', '.join(_STORAGE)} and fpo_ref_topk >= fpo_k (the spec suggests >= 4k).")


def union_topk(c: Float[Tensor, "batch m"], c_ref: Float[Tensor, "batch m"], k: int) -> Tensor:
    """I = topk_k(|c|) ∪ topk_k(|c_ref|) per row, as a boolean mask (codes are >= 0 for SAEs)."""
    k = min(k, c.shape[-1])
    idx = torch.cat([c.detach().abs().topk(k, dim=-1).indices, c_ref.abs().topk(k, dim=-1).indices], dim=-1)
    return torch.zeros(c.shape, dtype=torch.bool, device=c.device).scatter(-1, idx, True)


def feature_drift(c: Float[Tensor, "batch m"], c_ref: Float[Tensor, "batch m"], k: int) -> tuple[Tensor, Tensor]:
    """D = (1/|I|) Σ_{i∈I} (c_i − c_ref,i)² per row, and |I| (between k and 2k)."""
    mask = union_topk(c, c_ref, k)
    sq = (c - c_ref.to(c)).square()
    size = mask.sum(-1)
    return torch.where(mask, sq, torch.zeros_like(sq)).sum(-1) / size.to(sq.dtype), size


@LOSSES.register("fpo")
def fpo_loss(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
    feat_chosen: Tensor, feat_rejected: Tensor, ref_feat_chosen: Tensor, ref_feat_rejected: Tensor,
    beta: float, alpha: float, k: int,
) -> dict[str, Tensor]:
    """FPO (module docstring) from mean log-probs ā [B] and pooled codes c̄ [B, m]; returns the loss
    and what to log: D_w, D_l, |I|, top-k overlap with the reference, length-normalised reward accuracy."""
    margin = beta * ((chosen - rejected) - (ref_chosen - ref_rejected))
    d_w, size_w = feature_drift(feat_chosen, ref_feat_chosen, k)
    d_l, size_l = feature_drift(feat_rejected, ref_feat_rejected, k)
    u = margin - alpha * beta * (d_l - d_w.detach())
    kk = min(k, feat_chosen.shape[-1])
    sizes = torch.cat([size_w, size_l]).float()
    return {
        "loss": -F.logsigmoid(u).mean(),
        "fpo_d_chosen": d_w.detach().mean(), "fpo_d_rejected": d_l.detach().mean(),
        "fpo_union": sizes.mean(),
        "fpo_overlap": (2 * kk - sizes).mean() / kk,  # |topk_θ ∩ topk_ref| = 2k − |I|
        "fpo_accuracy": (chosen - ref_chosen > rejected - ref_rejected).float().mean(),
    }


@METHODS.register("fpo")
class FPOMethod(PreferenceMethod):
    """FPO's loss on trl's forward; the SAE is frozen (not in the optimiser) and reads float32 input."""

    config_cls = FPOConfig  # type: ignore[assignment]
    replaces_loss = True

    def __init__(self, config: FPOConfig) -> None:
        super().__init__(config)  # type: ignore[arg-type]
        self.cfg = config
        self.sae: SparseAutoencoder | None = None
        self._ref: dict[str, Tensor] = {}
        self._collected: list[tuple[Tensor, Tensor]] = []  # c̄_ref batches read during trl's reference pass

    def setup(self, loaded: LoadedModel) -> None:
        """Load the SAE and check it reads this model at the requested layer (before any training)."""
        info = loaded.info
        layer = None if self.cfg.fpo_layer is None else normalize_layer(self.cfg.fpo_layer, info.n_layers)
        sae = load_sae(str(self.cfg.fpo_sae), model=info, site=None if layer is None else f"resid_post.{layer}")
        if layer is not None and sae.site.layer != layer:
            raise ArtifactError(f"{self.cfg.fpo_sae} was trained at {sae.site}, but --fpo-layer is {layer}; "
                                f"pass --fpo-layer {sae.site.layer} or an SAE trained at layer {layer}.")
        self.sae = sae

    def _sae(self) -> SparseAutoencoder:
        if self.sae is None:
            raise ConfigError("FPO's SAE is not loaded; run through `train()` (it calls setup first).")
        return self.sae

    def sites(self, model: nn.Module) -> list[str]:
        return [str(self._sae().site)]

    def reference_sites(self) -> list[str]:
        return [str(self._sae().site)]

    @torch.no_grad()
    def collect_reference(self, hidden: dict[str, Tensor], completion_mask: Tensor) -> None:
        """c̄_ref of one batch of trl's reference pass: the same untrained forward, read in passing."""
        sae = self._sae()
        h = hidden[str(sae.site)]
        sae.to(h.device)
        chosen, rejected = pool_codes(sae, h, completion_mask).cpu().chunk(2)
        self._collected.append((chosen, rejected))

    @torch.no_grad()
    def prepare(self, model: nn.Module, dataset: Any, collate: Any) -> Artifact:
        """c̄_ref for every pair's chosen and rejected response, from the untrained model.

        Read during trl's own reference pass when it ran here (one process, no cached log-probs);
        otherwise one forward over the data.
        """
        sae, site = self._sae(), str(self._sae().site)
        n = len(dataset)
        width = sae.d_sae if self.cfg.fpo_ref_storage == "full" else min(self.cfg.fpo_ref_topk, sae.d_sae)
        vals = {side: torch.zeros(n, width) for side in ("chosen", "rejected")}
        idx = {side: torch.zeros(n, width, dtype=torch.int32) for side in ("chosen", "rejected")}

        def put(rows: Tensor, chosen: Tensor, rejected: Tensor) -> None:
            for side, codes in (("chosen", chosen), ("rejected", rejected)):
                if self.cfg.fpo_ref_storage == "full":
                    vals[side][rows] = codes
                else:  # top-k per response as it comes: the dense [n, d_sae] matrix never exists
                    top = codes.topk(width, dim=1)
                    vals[side][rows], idx[side][rows] = top.values, top.indices.int()

        collected, self._collected = self._collected, []
        if sum(len(c) for c, _ in collected) == n:  # trl's pass saw every row, in dataset order
            source, index, start = "trl_reference_pass", torch.tensor(list(dataset[_INDEX])), 0
            for chosen, rejected in collected:
                put(index[start : start + len(chosen)], chosen, rejected)
                start += len(chosen)
        else:
            source = "own_pass"
            device = next(model.parameters()).device
            sae.to(device)
            step = self.cfg.precompute_ref_batch_size or self.cfg.per_device_train_batch_size
            for start in range(0, n, step):
                batch = collate([dataset[i] for i in range(start, min(start + step, n))])
                with capture_live(tapped_model(model), [site]) as hidden:
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          use_cache=False)
                put(batch[_INDEX], *pool_codes(sae, hidden[site], batch["completion_mask"]).cpu().chunk(2))
        if self.cfg.fpo_ref_storage == "full":
            tensors = dict(vals)
        else:
            tensors = {f"{side}_{kind}": t[side] for side in ("chosen", "rejected") for kind, t in (("idx", idx), ("val", vals))}
        art = Artifact(kind=REFERENCE_KIND, tensors=tensors, meta={
            "site": site, "sae": str(self.cfg.fpo_sae), "d_sae": sae.d_sae, "pairs": n,
            "storage": self.cfg.fpo_ref_storage, "ref_topk": self.cfg.fpo_ref_topk, "source": source,
        })
        self.restore(art)  # train on exactly what a resumed run will read back
        return art

    def restore(self, artifact: Artifact) -> None:
        """The cached c̄_ref (also on resume). Top-k lists stay sparse; `_ref_rows` densifies a batch's rows."""
        sae, meta = self._sae(), artifact.meta
        if meta.get("site") != str(sae.site) or meta.get("d_sae") != sae.d_sae:
            raise ArtifactError(f"The run's cached reference features were made with an SAE at {meta.get('site')} "
                                f"({meta.get('d_sae')} latents), not {sae.site} ({sae.d_sae}); start a new --out.")
        t = artifact.tensors
        self._collected = []  # a resumed run's trl pass collected them again; the artefact is the truth
        if meta.get("storage") == "full":
            self._ref = {side: t[side].float() for side in ("chosen", "rejected")}
            return
        self._ref = {f"{side}_{kind}": t[f"{side}_{kind}"].long() if kind == "idx" else t[f"{side}_{kind}"].float()
                     for side in ("chosen", "rejected") for kind in ("idx", "val")}

    def _ref_rows(self, side: str, index: Tensor) -> Tensor:
        """c̄_ref of the batch rows `index`: dense [B, d_sae], zeros outside a stored top-k list."""
        if side in self._ref:
            return self._ref[side][index]
        idx, val = self._ref[f"{side}_idx"][index], self._ref[f"{side}_val"][index]
        return torch.zeros(len(index), self._sae().d_sae).scatter(1, idx, val)

    def preference_loss(self, batch: PreferenceBatch) -> dict[str, Tensor]:
        sae = self._sae()
        hidden = batch.hidden[str(sae.site)]
        if not self._ref:
            raise ConfigError("FPO's reference features are missing; they are computed by prepare() before training.")
        sae.to(hidden.device)
        feat_c, feat_r = pool_codes(sae, hidden, batch.completion_mask).chunk(2)
        index = batch.index.cpu()
        ref_c, ref_r = (self._ref_rows(s, index).to(feat_c.device) for s in ("chosen", "rejected"))
        chosen, rejected = batch.mean_logps()
        ref_chosen, ref_rejected = batch.ref_mean_logps()
        return fpo_loss(chosen, rejected, ref_chosen, ref_rejected, feat_c, feat_r, ref_c, ref_r,
                        beta=self.cfg.beta, alpha=self.cfg.fpo_alpha, k=self.cfg.fpo_k)
