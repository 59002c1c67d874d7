"""Pure loss functions `(hidden, direction, mask, ...) -> Tensor`, called from `compute_loss`.

Registered in `LOSSES` so methods pick them by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from latentguard.errors import ConfigError
from latentguard.registry import Registry

__all__ = ["LOSSES", "layer_projections", "projection_loss", "projection_penalty", "projections"]

LOSSES: Registry = Registry("loss")


def projections(
    hidden: Float[Tensor, "layer batch seq d_model"], direction: Float[Tensor, "layer d_model"]
) -> Float[Tensor, "layer batch seq"]:
    """z = rᵀx per layer and token, in float32 (bf16 projections are too noisy to anchor)."""
    return torch.einsum("lbtd,ld->lbt", hidden.float(), direction.float().to(hidden.device))


def layer_projections(
    hidden: Sequence[Float[Tensor, "batch seq d_model"]], direction: Float[Tensor, "layer d_model"]
) -> Float[Tensor, "layer batch seq"]:
    """`projections` without stacking the hidden states first: one [B, T] matmul per layer, in float32.

    Stacking L activations would copy them (and keep the copy for backward); this keeps only z.
    """
    if len(hidden) != direction.shape[0]:
        raise ConfigError(f"{len(hidden)} hidden states but {direction.shape[0]} directions; pass one per layer.")
    d = direction.float().to(hidden[0].device)
    return torch.stack([h.float() @ d[i] for i, h in enumerate(hidden)])


def projection_penalty(
    z: Float[Tensor, "layer batch seq"],
    mask: Bool[Tensor, "batch seq"],
    reference: Float[Tensor, "layer batch seq"] | None = None,
    penalty: str = "abs",
    tolerance: float = 0.0,
    reduce: str = "sum",
) -> Tensor:
    """Σ_layers Σ_masked tokens |z − z_ref| (or squared), mean over the batch, from projections z.

    `reduce="mean"` averages over layers and masked tokens instead (one number per layer-token, so
    its scale does not grow with depth or response length and α compares with the CE).

    `tolerance` > 0 is a relative dead zone: each |Δz| shrinks by tolerance·(1 + |z_ref|), floored
    at 0, so float noise between a cached reference and a live forward gives no gradient (with
    `abs`, any non-zero Δz would push with the full ±1).
    """
    if penalty not in ("abs", "sq"):
        raise ConfigError(f"penalty={penalty!r}; use 'abs' or 'sq'.")
    if reduce not in ("sum", "mean"):
        raise ConfigError(f"reduce={reduce!r}; use 'sum' (the paper) or 'mean'.")
    ref = None if reference is None else reference.float().to(z.device)
    delta = z if ref is None else z - ref
    mag = delta.abs()
    if tolerance > 0:
        mag = (mag - tolerance * (1 + (ref.abs() if ref is not None else 0))).clamp(min=0)
    per_token = mag if penalty == "abs" else mag.square()
    per_token = torch.where(mask.to(z.device).unsqueeze(0), per_token, torch.zeros_like(per_token))
    if reduce == "mean":
        return per_token.sum() / (mask.sum().clamp(min=1) * z.shape[0])
    return per_token.sum(dim=(0, 2)).mean()


@LOSSES.register("projection")
def projection_loss(
    hidden: Float[Tensor, "layer batch seq d_model"],
    direction: Float[Tensor, "layer d_model"],
    mask: Bool[Tensor, "batch seq"],
    reference: Float[Tensor, "layer batch seq"] | None = None,
    penalty: str = "abs",
) -> Tensor:
    """Σ_layers Σ_masked tokens |z − z_ref| (or squared), mean over the batch (ProCon Eq. L_ProCon).

    `reference=None` anchors to 0. Unmasked positions contribute nothing, whatever z or z_ref hold.
    """
    return projection_penalty(projections(hidden, direction), mask, reference, penalty)
