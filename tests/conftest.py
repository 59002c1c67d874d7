"""Shared fixtures: tiny seeded random models built from configs (no download) and the real
embedded model. Threads are pinned to 1: on 2 cores a second spinning thread slows torch ~5x."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

pytest_plugins = ["tests.serve.server_fixture"]

torch.set_num_threads(int(os.environ.get("LATENTGUARD_TEST_THREADS", "1")))

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).resolve().parents[1]

_COMMON = {
    "vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "pad_token_id": 258, "eos_token_id": 257, "bos_token_id": 256, "tie_word_embeddings": False,
}

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "gemma": lambda: GemmaConfig(**{**_COMMON, "head_dim": 16}),
    "gpt2": lambda: GPT2Config(
        vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=256,
        pad_token_id=258, eos_token_id=257, bos_token_id=256,
    ),
}
ARCH_NAMES = list(TINY_CONFIGS)


def build_tiny(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A seeded random-init 2-layer model of `arch` in eval mode, float32, on CPU."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    tok.padding_side = "left"
    return tok


@pytest.fixture(params=ARCH_NAMES)
def tiny_model(request):
    return build_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return build_tiny("llama")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M-Instruct), loaded once per session."""
    from latentguard.models import load_model

    return load_model("embedded")
