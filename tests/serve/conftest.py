"""Fixtures of the serve tests: the tiny Llama saved as a model directory, and direction artefacts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from latentguard.artifacts import Artifact
from latentguard.models import LoadedModel, ModelInfo, load_model
from tests.conftest import build_tiny
from tests.serve.server_fixture import ServerHandle, embedded_server, serve_subprocess  # noqa: F401

TINY_MAX_TOKENS = 240  # the tiny model has 256 positions


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """The seeded tiny Llama and the test tokenizer, saved where `--model PATH` can load them."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path) -> Iterator[ServerHandle]:
    """A tiny-model server with one-request batches and a two-slot queue (easy to fill)."""
    args = ("--max-batch-size", "1", "--queue-size", "2", "--max-tokens-limit", str(TINY_MAX_TOKENS),
            "--max-body-bytes", "65536")
    with serve_subprocess(str(tiny_model_dir), *args) as server:
        yield server


def save_direction(info: ModelInfo, out: Path, layer: int, seed: int = 0) -> Path:
    """A `refusal_direction` artefact holding a random unit direction, stamped for `info`'s model."""
    direction = torch.randn(info.d_model, generator=torch.Generator().manual_seed(seed))
    art = Artifact(kind="refusal_direction", tensors={"direction": direction / direction.norm()}, meta={"layer": layer})
    art.save(out, model=info)
    return out
