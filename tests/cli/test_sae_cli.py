"""`latentguard sae train|eval` on the tiny Llama: an artefact with its held-out figures, the same
figures from `eval`, and the one-line errors for a wrong site or model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentguard.cli.main import main
from tests.conftest import build_tiny

ROWS = [{"prompt": f"Tell me about the number {i}.", "chosen": f"The number {i} is a fine number, " * 2,
         "rejected": f"I will not talk about {i}."} for i in range(24)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sae_cli") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_train_then_eval(tmp_path, tiny_dir, pairs, capsys):
    out = tmp_path / "sae"
    args = ["sae", "train", "--model", str(tiny_dir), "--layer", "1", "--out", str(out), "--pairs", str(pairs),
            "--width", "96", "--k", "4", "--epochs", "2", "--max-tokens", "800", "--shard-tokens", "300",
            "--splice-pairs", "2"]
    assert main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["site"] == "resid_post.1" and meta["d_sae"] == 96 and meta["train"]["pairs"] == 43
    assert main(args) == 2 and "already holds an SAE; pass --overwrite" in capsys.readouterr().err
    assert main(["sae", "eval", "--model", str(tiny_dir), "--sae", str(out), "--pairs", str(pairs),
                 "--max-tokens", "300", "--out", str(tmp_path / "ev")]) == 0
    stats = json.loads((tmp_path / "ev/eval.json").read_text())
    assert stats["site"] == "resid_post.1" and 0 < stats["fvu"] and stats["l0"] == pytest.approx(4)
    assert "ce_increase" in stats["splice"] and not (tmp_path / "ev/activations").exists()


def test_eval_of_a_bare_file_needs_its_site(tmp_path, tiny_dir, pairs, capsys):
    save_file({"W_enc": torch.zeros(64, 8), "W_dec": torch.zeros(8, 64), "b_enc": torch.zeros(8),
               "b_dec": torch.zeros(64)}, str(tmp_path / "w.safetensors"))
    args = ["sae", "eval", "--model", str(tiny_dir), "--sae", str(tmp_path / "w.safetensors"), "--pairs", str(pairs),
            "--out", str(tmp_path / "ev")]
    assert main(args) == 2
    assert "carries no metadata; name the site" in capsys.readouterr().err
    assert main([*args, "--site", "resid_post.7"]) == 2
    assert "reads layer 7, this model has 2 layers" in capsys.readouterr().err
