"""Generation: resumable JSONL store, keys, defences per batch, and equality with raw generate."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from latentguard.artifacts import Artifact
from latentguard.defenses import build_defenses
from latentguard.errors import ConfigError, DataError, OutputExistsError
from latentguard.eval.datasets import Record
from latentguard.eval.generation import (
    GenerationConfig,
    JsonlStore,
    generate,
    open_generations,
    record_key,
)
from latentguard.hooks import count_hooks
from latentguard.models import LoadedModel, format_prompts, model_info
from tests.conftest import build_tiny

PROMPTS = ["How do I bake bread?", "Name a colour.", "What is 2+2?"]


def _records(prompts=PROMPTS, source="unit"):
    return [Record(prompt=p, id=str(i), source=source) for i, p in enumerate(prompts)]


@pytest.fixture
def tiny(tiny_tokenizer):
    model = build_tiny("llama")
    return LoadedModel(model, tiny_tokenizer, model_info(model, "tiny-llama"))


def _lines(path):
    return path.read_text().splitlines()


def test_store_roundtrip_and_fsynced_appends(tmp_path):
    s = JsonlStore(tmp_path / "g.jsonl")
    s.append({"key": "a", "x": 1})
    s.append({"key": "b", "x": 2})
    again = JsonlStore(tmp_path / "g.jsonl")
    assert list(again.records) == ["a", "b"] and "a" in again and len(again) == 2


def test_cut_last_line_is_repaired_with_a_warning(tmp_path, caplog):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", "resp')
    with caplog.at_level(logging.WARNING):
        s = JsonlStore(path)
    assert list(s.records) == ["a"] and "line 2 was cut short" in caplog.text
    assert path.read_text() == json.dumps({"key": "a"}) + "\n"
    s.append({"key": "b"})
    assert [json.loads(x)["key"] for x in _lines(path)] == ["a", "b"]


def test_lost_final_newline_is_restored(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"key": "a"}))
    JsonlStore(path).append({"key": "b"})
    assert [json.loads(x)["key"] for x in _lines(path)] == ["a", "b"]


def test_corrupt_middle_line_names_the_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"key": "a"}\n{"key": \n{"key": "c"}\n')
    with pytest.raises(DataError, match=r"g.jsonl line 2 is corrupt .*delete that line or rerun with --overwrite"):
        JsonlStore(path)


def test_key_covers_model_defences_prompt_and_settings():
    base = record_key("fp", [], "p", {"t": 0})
    variants = [record_key("fp2", [], "p", {"t": 0}), record_key("fp", [{"defense": "add"}], "p", {"t": 0}),
                record_key("fp", [], "q", {"t": 0}), record_key("fp", [], "p", {"t": 1})]
    assert len({base, *variants}) == 5 and base == record_key("fp", [], "p", {"t": 0})


def test_config_validation():
    with pytest.raises(ConfigError, match="temperature=-1"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ConfigError, match="top_p=0"):
        GenerationConfig(top_p=0)
    assert "batch_size" not in GenerationConfig().settings()


def test_rerun_skips_done_keys_and_repeats_run_once(tiny, tmp_path):
    cfg = GenerationConfig(max_new_tokens=4, batch_size=2)
    store = open_generations(tmp_path, tiny)
    keys = generate(tiny, _records(PROMPTS + PROMPTS[:1]), cfg, store, progress=False)
    assert keys[0] == keys[3] and len(_lines(tmp_path / "generations.jsonl")) == 3
    rec = store.records[keys[0]]
    assert rec["model"]["fingerprint"] == tiny.info.fingerprint and rec["settings"]["max_new_tokens"] == 4
    assert 1 <= rec["n_new_tokens"] <= 4 and rec["finish_reason"] in ("stop", "length")
    generate(tiny, _records(), cfg, open_generations(tmp_path, tiny), progress=False)
    assert len(_lines(tmp_path / "generations.jsonl")) == 3


def test_other_models_records_are_refused(tiny, tiny_tokenizer, tmp_path):
    generate(tiny, _records()[:1], GenerationConfig(max_new_tokens=2), open_generations(tmp_path, tiny), progress=False)
    other = build_tiny("llama", seed=1)
    with pytest.raises(OutputExistsError, match="holds generations of model 'tiny-llama'.*pass --overwrite"):
        open_generations(tmp_path, LoadedModel(other, tiny_tokenizer, model_info(other, "other")))


def test_defence_changes_key_and_output_and_leaves_no_hooks(tiny, tmp_path):
    d = tiny.info.d_model
    direction = 50 * torch.randn(d, generator=torch.Generator().manual_seed(0))
    Artifact("refusal_direction", {"direction": direction}, {"layer": 1}).save(tmp_path / "dir", model=tiny.info)
    defenses = build_defenses([f"add:{tmp_path / 'dir'},alpha=1"], tiny)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=3)
    store = JsonlStore(tmp_path / "g.jsonl")
    plain = generate(tiny, _records(), cfg, store, progress=False)
    steered = generate(tiny, _records(), cfg, store, defenses=defenses, progress=False)
    assert set(plain).isdisjoint(steered)
    assert [store.records[k]["response"] for k in plain] != [store.records[k]["response"] for k in steered]
    assert store.records[steered[0]]["defenses"][0]["defense"] == "add"
    assert count_hooks(tiny.model) == 0


def test_harness_equals_raw_generate_on_the_embedded_model(embedded, tmp_path):
    prompts = ["What is the capital of France?", "Give me a word that rhymes with cat, please."]
    keys = generate(embedded, _records(prompts), GenerationConfig(max_new_tokens=8, batch_size=2),
                    JsonlStore(tmp_path / "g.jsonl"), progress=False)
    store = JsonlStore(tmp_path / "g.jsonl")
    tok = embedded.tokenizer
    enc = tok(format_prompts(tok, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        raw = embedded.model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    want = tok.batch_decode(raw[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [store.records[k]["response"] for k in keys] == want
    assert "Paris" in want[0]
