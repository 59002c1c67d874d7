"""`latentguard scan` end to end on the real embedded model, and its bad inputs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from latentguard.artifacts import Artifact
from latentguard.cli.main import main
from latentguard.errors import ArtifactError
from latentguard.models import load_model
from tests.browser import assert_not_blank, screenshot


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scan") / "run"
    assert main(["scan", "--n", "32", "--batch-size", "16", "--out", str(out)]) == 0
    return out


def test_scan_writes_outputs(scan_dir):
    assert sorted(p.name for p in scan_dir.iterdir()) == ["directions", "report.html", "scan.json"]
    s = json.loads((scan_dir / "scan.json").read_text())
    assert s["settings"]["n_harmful"] == s["settings"]["n_harmless"] == 32
    assert len(s["layers"]) == 30 and len(s["heads"]["probe_test_acc"]) == 30
    assert len(s["heads"]["probe_test_acc"][0]) == 9
    # layer 0's input at the last prompt token is the same template token for every prompt: chance
    best = max(r["probe_test_acc"] for r in s["layers"])
    assert s["layers"][0]["probe_test_acc"] <= 0.6
    assert best >= s["layers"][0]["probe_test_acc"] + 0.3
    assert s["layers"][s["best_layer"]]["probe_test_acc"] >= 0.8


def test_scan_artifact_reloads_and_checks_fingerprint(scan_dir, embedded):
    art = Artifact.load(scan_dir / "directions", expect="scan_directions", model=embedded.info)
    assert art.tensors["directions"].shape == (30, 576)
    assert art.meta["model"]["fingerprint"] == embedded.info.fingerprint
    other = dataclasses.replace(embedded.info, fingerprint="0123456789abcdef", model_id="other")
    with pytest.raises(ArtifactError, match="this model is 0123456789abcdef"):
        Artifact.load(scan_dir / "directions", model=other)
    with pytest.raises(ArtifactError, match="holds a 'scan_directions' artefact, not 'refusal_direction'"):
        Artifact.load(scan_dir / "directions", expect="refusal_direction")


def test_scan_report_renders_in_chromium(scan_dir, tmp_path):
    png = tmp_path / "report.png"
    text = screenshot(scan_dir / "report.html", png)
    assert_not_blank(png)
    assert "Linear separability per layer" in text and "Attention heads" in text
    html = (scan_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing loaded from the network


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_bad_model_path(tmp_path, capsys):
    code, err = _run(["scan", "--model", str(tmp_path / "nope"), "--n", "4", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err and "--model embedded" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_malformed_data_file_names_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    code, err = _run(["scan", "--harmful", str(bad), "--n", "4", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "bad.jsonl line 3 is not valid JSON" in err
    assert not (tmp_path / "o").exists()


def test_empty_prompt_set(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    code, err = _run(["scan", "--harmless", str(empty), "--n", "4", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "holds no records" in err


def test_unknown_column(tmp_path, capsys):
    f = tmp_path / "p.csv"
    f.write_text("goal,target\nDo a thing,Sure\n")
    code, err = _run(["scan", "--harmful", str(f), "--column", "text", "--n", "4", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "has no column 'text'; columns: goal, target" in err


def test_existing_out_dir_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(["scan", "--n", "4", "--out", str(out)], capsys)
    assert code == 2 and "pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_settings(tmp_path, capsys):
    code, err = _run(["scan", "--n", "2", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "n=2; use at least 4" in err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("n: 8\nbogus: 1\n")
    code, err = _run(["scan", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "Unknown settings ['bogus']" in err


def test_hub_id_without_network_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception) as info:
        load_model("someorg/not-a-local-model")
    assert "pass the local directory with --model PATH" in str(info.value)
