"""`build_references` end to end on the tiny Llama: every stage runs, a rerun skips them, no training
prompt is an evaluation prompt, and two builds from different global RNG states are identical
(data bytes and model fingerprints), including the "one more epoch" resume of the alignment run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from latentguard.eval.datasets import shared_data_dir
from latentguard.models import load_model
from latentguard.training import reference_data as rd
from latentguard.training.reference import VARIANTS, ReferenceConfig, build_references


def _cfg(out, model) -> ReferenceConfig:
    """Every count tiny; one epoch plus one more (the tiny model fails acceptance, so the extension runs)."""
    return ReferenceConfig(out=str(out), model=str(model), n_refusal=4, n_retain=4, retain_tokens=4, n_borderline_val=2,
                           aligned_epochs=1, aligned_max_epochs=2, max_borderline_refusal=1.0, n_ift=4,
                           ift_answer_tokens=8, n_harmful=4, harmful_epochs=1, aligned_lora="r=2,alpha=4,targets=all-linear",
                           variant_lora="r=2,alpha=4,targets=q,v", batch_size=8, n_heldout=2, check_tokens=2)


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tiny_dir):
    outs, logs = [], []
    for rng in (1, 2):
        torch.manual_seed(rng)  # a different global RNG state before each build: the build must not read it
        random.seed(rng)
        out = tmp_path_factory.mktemp(f"refs{rng}")
        log: list[str] = []
        build_references(_cfg(out, tiny_dir), shared_data_dir(), log=log.append)
        outs.append(out)
        logs.append(log)
    return outs, logs


def test_every_stage_runs_and_a_rerun_skips_them(builds, tiny_dir):
    (out, _), (log, _) = builds
    build = json.loads((out / "build.json").read_text())
    assert set(build["stages"]) == {"data", "aligned", "aligned-ift", "aligned-ift-check", "aligned-harmfulft",
                                   "aligned-harmfulft-check", "embedded-check"}
    assert any("aligned after 2 epochs" in m for m in log)  # the tiny model fails acceptance: the extra epoch ran
    for name in VARIANTS:
        assert (out / name / "model.safetensors").is_file() and (out / name / "acceptance.json").is_file()
    again: list[str] = []
    build_references(_cfg(out, tiny_dir), shared_data_dir(), log=again.append)
    assert len(again) == 7 and all(m.endswith("done, skipped") for m in again)
    assert json.loads((out / "build.json").read_text())["stages"] == build["stages"]


def test_no_training_prompt_is_an_evaluation_prompt(builds):
    out = builds[0][0]
    evals = rd.read_eval_sets(shared_data_dir())
    heldout = json.loads((out / "data/heldout.json").read_text())
    eval_keys = evals.keys | {rd.normalize(p) for ps in heldout.values() for p in ps}
    rows = {name: [json.loads(line)["prompt"] for line in (out / f"data/{name}.jsonl").read_text().splitlines()]
            for name in ("aligned", "ift", "harmfulft")}
    for name in ("aligned", "ift"):
        assert rows[name] and not {rd.normalize(p) for p in rows[name]} & eval_keys, name
    # harmful FT uses AdvBench goals, but only the 117 of harmful_train: never one of advbench-heldout's 403
    train_keys = {rd.normalize(p) for p in evals.rd_harmful_train}
    assert all(rd.normalize(p) in train_keys for p in rows["harmfulft"])
    assert not {rd.normalize(p) for p in rows["harmfulft"]} & (eval_keys - train_keys)


def test_two_builds_are_identical(builds, tiny_dir):
    (a, b), _ = builds
    assert load_model(str(a / "aligned")).info.fingerprint != load_model(str(tiny_dir)).info.fingerprint
    for f in ("aligned.jsonl", "ift.jsonl", "harmfulft.jsonl", "heldout.json", "manifest.json", "embedded_check.json"):
        assert (a / "data" / f).read_bytes() == (b / "data" / f).read_bytes(), f
    for name in VARIANTS:
        fa, fb = load_model(str(a / name)).info.fingerprint, load_model(str(b / name)).info.fingerprint
        assert fa == fb, name
