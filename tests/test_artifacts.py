"""Artefacts round-trip through safetensors + JSON; loads are checked; outputs are all-or-nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from latentguard.artifacts import Artifact, staged_dir
from latentguard.errors import ArtifactError, OutputExistsError
from latentguard.models import model_info
from tests.conftest import build_tiny


def test_roundtrip_identical_tensors_and_stamp(tmp_path):
    model = build_tiny("llama")
    info = model_info(model, "tiny")
    t = {"direction": torch.randn(64), "grid": torch.randn(2, 3, 64, dtype=torch.float64)}
    Artifact("refusal_direction", t, {"layer": 1}).save(tmp_path / "a", model=info)
    art = Artifact.load(tmp_path / "a", expect="refusal_direction", model=info)
    for k, want in t.items():
        assert torch.equal(art.tensors[k], want) and art.tensors[k].dtype == want.dtype
    assert art.meta["layer"] == 1 and art.meta["model"]["fingerprint"] == info.fingerprint
    assert {"created_utc", "latentguard_version", "schema"} <= set(art.meta)
    assert not list((tmp_path / "a").glob("*.pt")) and not list((tmp_path / "a").glob("*.pkl"))


def test_shape_mismatch_and_schema_are_refused(tmp_path):
    info = model_info(build_tiny("llama"), "tiny")
    Artifact("x", {"v": torch.zeros(1)}).save(tmp_path / "a", model=info)
    gpt2 = model_info(build_tiny("gpt2"), "tiny-gpt2")
    with pytest.raises(ArtifactError, match="model_type=llama, this model has model_type=gpt2"):
        Artifact.load(tmp_path / "a", model=gpt2)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    meta["schema"] = 99
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="has schema 99"):
        Artifact.load(tmp_path / "a")


def test_fingerprint_mismatch_can_be_allowed_with_warning(tmp_path):
    info = model_info(build_tiny("llama"), "tiny")
    Artifact("x", {"v": torch.zeros(1)}).save(tmp_path / "a", model=info)
    tuned = dataclasses.replace(info, fingerprint="feedfacefeedface")
    with pytest.raises(ArtifactError, match="allow the mismatch explicitly"):
        Artifact.load(tmp_path / "a", model=tuned)
    with pytest.warns(UserWarning, match="fine-tune of the same base"):
        Artifact.load(tmp_path / "a", model=tuned, allow_fingerprint_mismatch=True)


def test_not_an_artifact_and_corrupt(tmp_path):
    with pytest.raises(ArtifactError, match="is not an artefact directory"):
        Artifact.load(tmp_path)
    Artifact("x", {"v": torch.zeros(3)}).save(tmp_path / "a")
    (tmp_path / "a" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="is corrupt"):
        Artifact.load(tmp_path / "a")


def test_staged_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "half.json").write_text("{}")
        raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(OutputExistsError, match="pass --overwrite"), staged_dir(out):
        pass
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
