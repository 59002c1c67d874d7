"""Fixtures for training tests: the tiny Llama saved as a model directory, and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import build_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The seeded tiny Llama + ChatML byte tokenizer as a loadable model directory."""
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Same shape, other seed: a different model with the same architecture."""
    path = tmp_path_factory.mktemp("tiny_llama_other")
    build_tiny("llama", seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """16 instruction/output rows (the safety-tuned-llamas column names)."""
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    rows = [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(16)]
    path.write_text(json.dumps(rows))
    return path
