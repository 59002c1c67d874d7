"""Pure loss functions `(hidden, direction, mask, ...) -> Tensor`, called from `compute_loss`.

Registered in `LOSSES` so methods pick them by name.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from latentguard.errors import ConfigError
from latentguard.registry import Registry

__all__ = ["LOSSES", "projection_loss", "projections"]

LOSSES: Registry = Registry("loss")


def projections(
    hidden: Float[Tensor, "layer batch seq d_model"], direction: Float[Tensor, "layer d_model"]
) -> Float[Tensor, "layer batch seq"]:
    """z = rᵀx per layer and token, in float32 (bf16 projections are too noisy to anchor)."""
    return torch.einsum("lbtd,ld->lbt", hidden.float(), direction.float().to(hidden.device))


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
    if penalty not in ("abs", "sq"):
        raise ConfigError(f"penalty={penalty!r}; use 'abs' or 'sq'.")
    z = projections(hidden, direction)
    delta = z if reference is None else z - reference.float().to(z.device)
    per_token = delta.abs() if penalty == "abs" else delta.square()
    per_token = torch.where(mask.to(z.device).unsqueeze(0), per_token, torch.zeros_like(per_token))
    return per_token.sum(dim=(0, 2)).mean()
