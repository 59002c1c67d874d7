"""`latentguard reference pairs` on the tiny Llama: harmful prompts get (refusal, compliance), benign
ones (answer, refusal); the harmful prompts never come from the AdvBench test split."""

from __future__ import annotations

import json

from latentguard.cli.main import main
from latentguard.eval.datasets import resolve_dataset
from latentguard.training.preference import read_preference_pairs
from latentguard.training.reference_data import REFUSALS, normalize


def test_safety_pairs_file(tmp_path, tiny_dir):
    out = tmp_path / "pairs.jsonl"
    args = ["reference", "pairs", "--model", str(tiny_dir), "--out", str(out), "--n-harmful", "3", "--n-benign", "2",
            "--max-new-tokens", "6"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(read_preference_pairs(out)) == len(rows) == 5
    harmful = [r for r in rows if r["kind"] == "harmful"]
    benign = [r for r in rows if r["kind"] == "benign"]
    assert len(harmful) == 3 and len(benign) == 2
    assert all(r["chosen"] in REFUSALS and r["rejected"] not in REFUSALS for r in harmful)
    assert all(r["rejected"] in REFUSALS and r["chosen"] not in REFUSALS for r in benign)
    heldout = {normalize(r.prompt) for r in resolve_dataset("advbench-heldout").load()}
    assert not any(normalize(r["prompt"]) in heldout for r in rows)
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["harmful"] == 3 and manifest["benign"] == 2
    assert main(args) == 2  # an existing file needs --overwrite
