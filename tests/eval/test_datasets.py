"""Named datasets, suites and user data specs, read from the real shared data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentguard.errors import ConfigError, DataError
from latentguard.eval.datasets import (
    DATASETS,
    ROLES,
    normalize_text,
    portable_path,
    read_records,
    resolve_dataset,
    select_datasets,
    shared_data_dir,
    user_dataset,
)

EXPECTED = {
    "advbench": ("harmful", 520), "advbench-heldout": ("harmful", 403),
    "harmbench-val": ("harmful", 41), "harmbench-test": ("harmful", 159),
    "xstest-safe": ("overrefusal", 250), "xstest-unsafe": ("harmful", 200),
    "gsm8k-test": ("utility", 1319), "gsm8k-train": ("utility", 7473),
    "i-maliciousinstructions": ("harmful", 100), "q-harm": ("harmful", 100), "i-cona": ("harmful", 178),
    "i-controversial": ("harmful", 40), "i-alpaca": ("overrefusal", 50),
    "rd-harmful-train": ("harmful", 260), "rd-harmful-val": ("harmful", 39), "rd-harmful-test": ("harmful", 572),
    "rd-harmless-val": ("overrefusal", 6264),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_dataset_sizes_roles_and_provenance(name: str) -> None:
    d = DATASETS.get(name)
    recs = d.load()
    assert (d.role, len(recs)) == EXPECTED[name]
    assert all(r.source == name for r in recs)
    assert len({r.id for r in recs}) == len(recs)


def test_advbench_heldout_excludes_every_direction_training_goal() -> None:
    train = {normalize_text(r.prompt) for r in DATASETS.get("rd-harmful-train").load()}
    full = DATASETS.get("advbench").load()
    held = DATASETS.get("advbench-heldout").load()
    assert sum(normalize_text(r.prompt) in train for r in full) == 117
    assert not any(normalize_text(r.prompt) in train for r in held)
    assert len(held) == len(full) - 117
    assert {r.id for r in held} <= {r.id for r in full}  # ids are AdvBench row indices


def test_categories_and_extra_fields() -> None:
    hb = DATASETS.get("harmbench-val").load()
    assert hb[0].id == "safrole_oil_extraction_guide" and hb[0].category == "chemical_biological"
    xs = DATASETS.get("xstest-unsafe").load()
    assert all(r.category.startswith("contrast_") for r in xs) and "focus" in xs[0].extra
    gsm = DATASETS.get("gsm8k-test").load(limit=2, seed=0)
    assert all("####" in r.extra["answer"] for r in gsm)
    mi = DATASETS.get("i-maliciousinstructions").load()
    assert mi[0].category == "crime"


def test_limit_is_a_seeded_sample() -> None:
    d = DATASETS.get("xstest-safe")
    a, b, c = d.load(5, seed=1), d.load(5, seed=1), d.load(5, seed=2)
    assert [r.id for r in a] == [r.id for r in b] != [r.id for r in c]


def test_suites_default_and_datasets_override() -> None:
    assert [d.name for d in select_datasets(None, None)] == ["advbench-heldout", "xstest-safe", "gsm8k-test"]
    assert [d.name for d in select_datasets("overrefusal", None)] == ["xstest-safe"]
    assert [d.name for d in select_datasets(None, "q-harm, I-Alpaca")] == ["q-harm", "i-alpaca"]
    assert set(ROLES) == {"harmful", "overrefusal", "utility"}


def test_bad_suite_dataset_and_role_mismatch_raise_one_line() -> None:
    with pytest.raises(ConfigError, match="Unknown suite 'harmfull'"):
        select_datasets("harmfull", None)
    with pytest.raises(ConfigError, match="Unknown dataset 'xstest-saf'.*Did you mean 'xstest-safe'"):
        select_datasets(None, "xstest-saf")
    with pytest.raises(ConfigError, match="role 'utility', not in --suite harmful"):
        select_datasets("harmful", "gsm8k-test")


def test_user_csv_with_column_and_mapping(tmp_path) -> None:
    f = tmp_path / "mine.csv"
    f.write_text("q,kind,ref\nhow do I bake bread?,food,x\nhow do I kill a process?,tech,y\n")
    plain = resolve_dataset(f"{f}:q")
    assert plain.role == "harmful" and next(r.prompt for r in plain.load()) == "how do I bake bread?"
    mapped = resolve_dataset(f"{f}:prompt=q,category=kind,id=ref,answer=ref,role=overrefusal")
    recs = mapped.load()
    assert mapped.role == "overrefusal"
    assert [(r.id, r.category, r.extra["answer"]) for r in recs] == [("x", "food", "x"), ("y", "tech", "y")]
    spec = f"{f}:prompt=q,role=overrefusal,xstest-safe"
    assert [d.name for d in select_datasets(None, spec)] == [f"{f}:prompt=q,role=overrefusal", "xstest-safe"]


def test_user_data_errors_name_the_fix(tmp_path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(DataError, match="has no column 'prompt2'.*columns: text"):
        resolve_dataset(f"{f}:prompt2").load()
    with pytest.raises(ConfigError, match="Bad column mapping 'colour=x'"):
        resolve_dataset(f"{f}:colour=x")
    with pytest.raises(DataError, match="neither a known name nor an existing path"):
        user_dataset(str(tmp_path / "missing.csv"))
    f.write_text(json.dumps({"text": "a"}) + "\n{broken\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(f)


def test_hf_dataset_saved_to_disk(tmp_path) -> None:
    from datasets import Dataset as HFDataset
    from datasets import DatasetDict

    ds = HFDataset.from_dict({"question": ["what is 2+2?", "what is 3+3?"], "solution": ["#### 4", "#### 6"]})
    DatasetDict({"test": ds, "train": ds}).save_to_disk(str(tmp_path / "hf"))
    d = resolve_dataset(f"{tmp_path / 'hf'}:prompt=question,answer=solution,split=test,role=utility")
    recs = d.load()
    assert d.role == "utility" and [(r.id, r.extra["answer"]) for r in recs] == [("0", "#### 4"), ("1", "#### 6")]
    with pytest.raises(DataError, match="holds splits test, train; pick one with split=NAME"):
        resolve_dataset(f"{tmp_path / 'hf'}:prompt=question").load()


def test_portable_path_hides_this_machines_layout(tmp_path) -> None:
    shared = shared_data_dir().resolve()
    assert portable_path(shared / "xstest" / "xstest_prompts.csv") == "<shared>/xstest/xstest_prompts.csv"
    keyword_list = Path(__file__).resolve().parents[2] / "src/latentguard/eval/refusal_lists/project-v1.json"
    assert portable_path(keyword_list) in ("src/latentguard/eval/refusal_lists/project-v1.json",
                                           "latentguard/eval/refusal_lists/project-v1.json")
    assert portable_path(tmp_path / "mine.json") == str(tmp_path / "mine.json")  # a user's own file: as given
    assert portable_path("data/mine.json") == "data/mine.json"
