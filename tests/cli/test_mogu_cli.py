"""`latentguard analyze router` and the MoGU flags of `latentguard train`, on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentguard.cli.main import main
from latentguard.defenses.mogu import MoGUModules
from latentguard.models import model_info
from tests.conftest import build_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_analyze_router_writes_gates_per_layer(tmp_path, tiny_dir):
    model = build_tiny("llama")
    MoGUModules.for_model(model, [1], gate="mlp").to_artifact({"method": "mogu2", "k": 5}).save(
        tmp_path / "art", model=model_info(model, model_id=str(tiny_dir)))
    rc = main(["analyze", "router", "--model", str(tiny_dir), "--mogu", str(tmp_path / "art"), "--n", "6",
               "--out", str(tmp_path / "router")])
    assert rc == 0
    doc = json.loads((tmp_path / "router" / "router.json").read_text())
    assert doc["layers"] == [1] and doc["gate"] == "mlp" and doc["data"]["harmful"]["n"] == 6
    row = doc["last"]["layers"][0]
    assert 0 < row["harmful_w_u"]["mean"] < 1 and row["auroc_wu_minus_wg"] is not None
    assert (tmp_path / "router" / "router.png").stat().st_size > 1000


def test_train_mogu_flags_and_one_line_errors(tmp_path, tiny_dir, capsys):
    assert main(["train", "--method", "mogu2", "--model", str(tiny_dir), "--mogu-layers", "0,5",
                 "--out", str(tmp_path / "a")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["train", "--method", "mogu", "--mogu-top-k", "2", "--out", str(tmp_path / "b")]) == 2
    assert "does not apply to method 'mogu'" in capsys.readouterr().err  # a v2 flag on v1
    assert main(["analyze", "router", "--model", str(tiny_dir), "--out", str(tmp_path / "c")]) == 2
    assert "--mogu DIR" in capsys.readouterr().err
