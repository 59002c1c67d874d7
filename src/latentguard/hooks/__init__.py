"""Hooks: taps (read) and edits (add, ablate, project) at named sites of any HF causal LM."""

from latentguard.hooks.edits import ablation_sites, add_vectors, edit, project_out
from latentguard.hooks.sites import (
    SITE_KINDS,
    Site,
    all_sites,
    count_hooks,
    hook_site,
    parse_site,
    parse_sites,
)
from latentguard.hooks.taps import (
    POSITIONS,
    Batch,
    capture,
    collect,
    encode_batch,
    position_ids_from_mask,
)

__all__ = [
    "POSITIONS",
    "SITE_KINDS",
    "Batch",
    "Site",
    "ablation_sites",
    "add_vectors",
    "all_sites",
    "capture",
    "collect",
    "count_hooks",
    "edit",
    "encode_batch",
    "hook_site",
    "parse_site",
    "parse_sites",
    "position_ids_from_mask",
    "project_out",
]
