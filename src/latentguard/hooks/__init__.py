"""Hooks: taps (read) and edits (add, ablate, project) at named sites of any HF causal LM."""

from latentguard.hooks.edits import ablation_sites, add_vectors, edit, project_out
from latentguard.hooks.sites import SITE_KINDS, Site, all_sites, count_hooks, hook_site, parse_site, parse_sites
from latentguard.hooks.taps import POSITIONS, Batch, capture, collect, encode_batch, position_ids_from_mask

__all__ = [
    "ablation_sites", "add_vectors", "edit", "project_out", "SITE_KINDS", "Site", "all_sites",
    "count_hooks", "hook_site", "parse_site", "parse_sites", "POSITIONS", "Batch", "capture",
    "collect", "encode_batch", "position_ids_from_mask",
]
