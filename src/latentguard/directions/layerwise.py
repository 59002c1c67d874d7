"""One refusal direction per layer (ProCon §1): unit diff in means at the last prompt token.

r^(l) = (μ_harmful − μ_harmless) / ‖·‖ of `resid_pre.l` (= `hidden_states[l]`, the block input;
never the final-norm output) for l = 0..L−1, no Arditi-style selection, sign towards refusal.
A layer whose difference is zero (layer 0 reads the same template token for every prompt)
gets a zero row: its projection is 0 and it constrains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentguard.artifacts import Artifact, sha256_of_texts
from latentguard.directions.drift import DriftConfig, class_stats
from latentguard.errors import ArtifactError, DataError
from latentguard.models import LoadedModel, ModelInfo

__all__ = ["LAYER_DIRECTION_KINDS", "LayerDirections", "extract_layer_directions", "load_layer_directions", "unit_rows"]

# artefacts holding one direction per layer at resid_pre, last prompt token
LAYER_DIRECTION_KINDS = ("procon_directions", "procon_reference", "scan_directions")


@dataclass
class LayerDirections:
    directions: Float[Tensor, "L d"]  # unit rows (zero where degenerate), float32
    zero_layers: list[int]
    source: dict[str, Any]

    def artifact(self) -> Artifact:
        return Artifact(kind="procon_directions", tensors={"directions": self.directions},
                        meta={"site": "resid_pre", "position": "last prompt token", "zero_layers": self.zero_layers,
                              "source": self.source})


def unit_rows(raw: Float[Tensor, "L d"], eps: float = 1e-8) -> tuple[Float[Tensor, "L d"], list[int]]:
    """Row-normalised float32 copy; rows with norm <= eps become zero (and are listed)."""
    raw = raw.double()
    norms = raw.norm(dim=-1, keepdim=True)
    zero = (norms.squeeze(-1) <= eps)
    unit = torch.where(zero.unsqueeze(-1), torch.zeros_like(raw), raw / norms.clamp(min=eps))
    return unit.float(), [int(i) for i in torch.nonzero(zero).flatten()]


def extract_layer_directions(
    loaded: LoadedModel, harmful: list[str], harmless: list[str], batch_size: int = 16, system: str | None = None
) -> LayerDirections:
    """Diff-in-means unit direction per layer from raw prompts (chat-formatted here, last prompt token)."""
    if len(harmful) < 1 or len(harmless) < 1:
        raise DataError(f"Need harmful and harmless prompts for the directions; got {len(harmful)} and {len(harmless)}.")
    cfg = DriftConfig(n=max(2, len(harmful), len(harmless)), batch_size=batch_size, system=system)
    stats = class_stats(loaded, harmful, harmless, cfg, position=-1)
    unit, zero = unit_rows(stats.directions())
    source = {"kind": "diff_in_means", "n_harmful": len(harmful), "n_harmless": len(harmless),
              "harmful_sha256": sha256_of_texts(harmful), "harmless_sha256": sha256_of_texts(harmless),
              "system_prompt": "template default" if system is None else system}
    return LayerDirections(unit, zero, source)


def load_layer_directions(path: str, info: ModelInfo) -> LayerDirections:
    """Directions from a `procon_directions` / `procon_reference` / `scan_directions` artefact of this model."""
    art = Artifact.load(path, model=info)
    if art.kind not in LAYER_DIRECTION_KINDS:
        raise ArtifactError(f"{path} is a {art.kind!r} artefact; pass one of {', '.join(LAYER_DIRECTION_KINDS)}.")
    raw = art.tensors["directions"]
    if raw.shape != (info.n_layers, info.d_model):
        raise ArtifactError(f"{path} holds directions of shape {tuple(raw.shape)}, this model needs "
                            f"({info.n_layers}, {info.d_model}); rebuild them on this model.")
    unit, zero = unit_rows(raw)
    return LayerDirections(unit, zero, {"kind": "artifact", "path": str(path), "artifact_kind": art.kind})
