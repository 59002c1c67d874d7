"""Model loading, architecture table and chat formatting."""

from latentguard.models.arch import ARCHS, ArchSpec, arch_of, normalize_layer, text_config
from latentguard.models.chat import eoi_token_ids, format_prompts
from latentguard.models.loading import (
    EMBEDDED,
    LoadedModel,
    ModelInfo,
    cache_dir,
    embedded_gguf,
    fingerprint,
    load_model,
    model_info,
)

__all__ = [
    "ARCHS", "ArchSpec", "arch_of", "normalize_layer", "text_config", "eoi_token_ids",
    "format_prompts", "EMBEDDED", "LoadedModel", "ModelInfo", "cache_dir", "embedded_gguf",
    "fingerprint", "load_model", "model_info",
]
