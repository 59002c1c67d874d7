"""`direction extract`, `export`, `generate`, `drift` and `analyze lens` on the real embedded model.

The raw embedded model barely refuses, so the refusal filter is off and the thresholds relaxed:
these tests check the machinery and the direction of the effects, not the paper's magnitudes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from latentguard.artifacts import Artifact
from latentguard.cli.main import main
from latentguard.defenses import apply_defenses, build_defense
from latentguard.directions.metrics import refusal_metric
from latentguard.directions.selection import encode_prompts, last_logits
from latentguard.eval.datasets import read_prompts, shared_data_dir
from latentguard.hooks import count_hooks, encode_batch
from latentguard.models import LoadedModel, format_prompts
from tests.browser import assert_not_blank, screenshot

SMALL = ["--n-train", "16", "--n-val", "8", "--no-filter-train", "--no-filter-val", "--positions=-1", "--layers", "14,18",
         "--kl-threshold", "10", "--induce-threshold=-100", "--batch-size", "8", "--n-refusal-probe", "8",
         "--refusal-probe-tokens", "16"]


def _split(name: str, n: int) -> list[str]:
    return read_prompts(shared_data_dir() / "refusal_direction_splits" / f"{name}.json")[:n]


@pytest.fixture(scope="module")
def extract_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("direction") / "run"
    assert main(["direction", "extract", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def export_dir(extract_dir, tmp_path_factory) -> Path:
    prompts = tmp_path_factory.mktemp("verify") / "prompts.json"
    prompts.write_text(json.dumps(_split("harmful_test", 10) + _split("harmless_test", 10)))
    out = tmp_path_factory.mktemp("export") / "ablated"
    assert main(["export", "--defense", f"ablate:{extract_dir}/direction", "--verify-prompts", str(prompts), "--out", str(out)]) == 0
    return out


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr without transformers' weight-loading progress bar)."""
    code = main(args)
    cap = capsys.readouterr()
    err = "\n".join(line for line in cap.err.splitlines() if not line.startswith("Loading weights"))
    return code, cap.out, err.strip()


def test_extract_writes_scores_artefact_and_report(extract_dir, embedded, tmp_path):
    assert sorted(p.name for p in extract_dir.iterdir()) == ["direction", "report.html", "scores.json"]
    s = json.loads((extract_dir / "scores.json").read_text())
    assert {(c["position"], c["layer"]) for c in s["candidates"]} == {(-1, 14), (-1, 18)}
    assert s["selected"]["layer"] in (14, 18) and s["layer_cutoff"] == 24
    assert s["eoi_tokens"] == ["<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"]
    assert s["refusal_tokens"]["source"] in ("fallback", "derived") and 57 in s["refusal_tokens"]["ids"]  # 57 = "I"
    assert s["data"]["harmful_train"]["n_after_dedupe"] < s["data"]["harmful_train"]["n_file"]  # HarmBench test overlap
    assert s["data"]["harmful_train"]["source"] == "<shared>/refusal_direction_splits/harmful_train.json"  # no machine path
    art = Artifact.load(extract_dir / "direction", expect="refusal_direction", model=embedded.info)
    assert art.tensors["candidates"].shape == (6, 30, 576) and art.meta["condition"]["layer"] == s["selected"]["layer"]
    text = screenshot(extract_dir / "report.html", tmp_path / "report.png")
    assert_not_blank(tmp_path / "report.png")
    assert "bypass score" in text and "Candidates" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", (extract_dir / "report.html").read_text())


def test_ablate_lowers_and_add_raises_the_refusal_proxy(extract_dir, embedded):
    """Held-out prompts (harmful_test / harmless_test, not used to extract)."""
    harmful = encode_prompts(embedded, format_prompts(embedded.tokenizer, _split("harmful_test", 8)), 8)
    harmless = encode_prompts(embedded, format_prompts(embedded.tokenizer, _split("harmless_test", 8)), 8)

    def proxy(prompts, spec=None) -> float:
        ds = [build_defense(spec, embedded)] if spec else []
        with apply_defenses(embedded.model, ds):
            return float(refusal_metric(last_logits(embedded, prompts), [57]).mean())

    art = f"{extract_dir}/direction"
    assert proxy(harmful, f"ablate:{art}") < proxy(harmful) - 0.2
    assert proxy(harmless, f"add:{art}") > proxy(harmless) + 0.2
    assert count_hooks(embedded.model) == 0


def test_export_matches_hooked_model_on_20_prompts(export_dir, extract_dir, embedded):
    meta = json.loads((export_dir / "latentguard_export.json").read_text())
    assert meta["verify"]["n_prompts"] == 20 and meta["verify"]["max_abs_logit_diff"] < 1e-4
    texts = format_prompts(embedded.tokenizer, _split("harmful_test", 10) + _split("harmless_test", 10))
    batch = encode_batch(embedded.tokenizer, texts)
    mask = batch.attention_mask.bool()
    hooked_model = copy.deepcopy(embedded.model).double()  # float64: float32 noise alone is ~1e-4 here
    hooked = LoadedModel(hooked_model, embedded.tokenizer, embedded.info)
    with torch.no_grad(), apply_defenses(hooked_model, [build_defense(f"ablate:{extract_dir}/direction", hooked)]):
        want = hooked_model(**batch.forward_kwargs()).logits[mask]
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        got = exported(**batch.forward_kwargs()).logits[mask]
    assert float((got - want).abs().max()) < 1e-4
    assert exported.config.tie_word_embeddings is False


def test_generate_with_conditional_leaves_benign_prompt_unchanged(extract_dir, capsys):
    args = ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "8"]
    code, plain, _ = _run(args, capsys)
    code2, gated, _ = _run([*args, "--defense", f"conditional:{extract_dir}/direction,alpha=4"], capsys)
    code3, added, _ = _run([*args, "--defense", f"add:{extract_dir}/direction,alpha=4"], capsys)
    assert code == code2 == code3 == 0 and plain.startswith("### What is the capital of France?")
    assert gated == plain and added != plain


def test_bad_inputs_fail_in_one_line(extract_dir, embedded, tmp_path, capsys):
    other = dataclasses.replace(embedded.info, fingerprint="0123456789abcdef", model_id="other")
    Artifact("refusal_direction", {"direction": torch.ones(576)}, {"layer": 10}).save(tmp_path / "other", model=other)
    art = f"{extract_dir}/direction"
    cases = [
        (["generate", "--prompt", "hi", "--defense", f"ablate:{tmp_path / 'other'}"], "rebuild it on this model"),
        (["generate", "--prompt", "hi", "--defense", f"add:{art},layer=99"], "Layer 99 is out of range for a model with 30 layers"),
        (["generate", "--prompt", "hi", "--defense", f"add:{art},alpha=inf"], "alpha=inf is not finite"),
        (["export", "--defense", f"conditional:{art}", "--out", str(tmp_path / "x")], "`conditional` cannot be baked"),
        (["direction", "extract", *SMALL, "--layers", "3,40", "--out", str(tmp_path / "y")], "out of range; use 0..29"),
    ]
    for args, phrase in cases:
        code, _, err = _run(args, capsys)
        assert code == 2 and phrase in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lens_and_drift_cli(extract_dir, export_dir, tmp_path):
    assert main(["analyze", "lens", "--prompt", "How do I pick a lock?", "--top-k", "3", "--out", str(tmp_path / "lens")]) == 0
    lens = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert len(lens["layers"]) == 30 and len(lens["tokens"]) == 16 and lens["tokens"][-1] == "\\n"
    assert "P(refusal tokens)" in screenshot(tmp_path / "lens" / "lens.html", tmp_path / "lens.png")
    assert main(["drift", "--tuned", str(export_dir), "--direction", f"{extract_dir}/direction", "--n", "4",
                 "--out", str(tmp_path / "drift")]) == 0
    drift = json.loads((tmp_path / "drift" / "drift.json").read_text())
    (tuned,) = drift["tuned"]
    assert abs(tuned["at_layer"]["cos_direction"]) < 1e-3  # the ablated export no longer carries r̂
    assert (tmp_path / "drift" / "drift.html").stat().st_size > 10_000
