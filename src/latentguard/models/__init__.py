"""Model loading, architecture table and chat formatting."""

from latentguard.models.arch import (
    ARCHS,
    PROJECTION_ROLES,
    ArchSpec,
    arch_of,
    normalize_layer,
    text_config,
)
from latentguard.models.chat import eoi_token_ids, format_chats, format_prompts
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
    "ARCHS",
    "EMBEDDED",
    "PROJECTION_ROLES",
    "ArchSpec",
    "LoadedModel",
    "ModelInfo",
    "arch_of",
    "cache_dir",
    "embedded_gguf",
    "eoi_token_ids",
    "fingerprint",
    "format_chats",
    "format_prompts",
    "load_model",
    "model_info",
    "normalize_layer",
    "text_config",
]
