"""Training data: `--data` specs, file formats with column mapping, named sets, bad inputs."""

from __future__ import annotations

import json

import pytest

from latentguard.errors import ConfigError, DataError
from latentguard.eval.datasets import shared_data_dir
from latentguard.training.data import DataSpec, load_spec, parse_data_spec, read_pairs


@pytest.mark.parametrize(("text", "spec"), [
    ("gsm8k-train", DataSpec("gsm8k-train", 1.0)),
    ("gsm8k-train:0.25", DataSpec("gsm8k-train", 0.25)),
    ("safety:100", DataSpec("safety", 100)),
    ("dir/file.jsonl:1e-1", DataSpec("dir/file.jsonl", 0.1)),
    ("file.csv:notanumber", DataSpec("file.csv:notanumber", 1.0)),
])
def test_parse_data_spec(text, spec):
    got = parse_data_spec(text)
    assert got == spec and type(got.weight) is type(spec.weight)


def test_zero_weight_is_rejected():
    with pytest.raises(ConfigError, match="must be > 0"):
        parse_data_spec("safety:0")


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_formats_and_column_mapping(tmp_path, fmt):
    rows = [{"q": "What is 2+2?", "a": "4"}, {"q": "Capital of France?", "a": "Paris"}]
    path = tmp_path / f"d.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("q,a\n" + "".join(f"\"{r['q']}\",{r['a']}\n" for r in rows))
    pairs = read_pairs(path, prompt_column="q", response_column="a")
    assert [(p.prompt, p.response) for p in pairs] == [("What is 2+2?", "4"), ("Capital of France?", "Paris")]


def test_alpaca_input_is_appended(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Translate.", "input": "bonjour", "output": "hello"}]))
    assert read_pairs(path)[0].prompt == "Translate.\n\nbonjour"


def test_missing_response_column_names_the_fix(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match="no response column.*--response-column"):
        read_pairs(path)


def test_named_sets_read_the_shared_folder():
    gsm = load_spec(DataSpec("gsm8k"), shared_data_dir())
    assert len(gsm) == 7473 and "####" in gsm[0].response and gsm[0].source == "gsm8k-train"
    safety = load_spec(DataSpec("safety"), shared_data_dir())
    assert len(safety) == 2483 and all(p.prompt and p.response for p in safety)


def test_unknown_named_set_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Unknown training set 'gsm8'.*Known: advbench-targets, gsm8k-train, safety"):
        load_spec(DataSpec("gsm8"), shared_data_dir())
