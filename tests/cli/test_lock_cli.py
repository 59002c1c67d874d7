"""`latentguard lock create|apply|tune` and `steer pas` through the CLI: tiny models and the embedded one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentguard.cli.main import main
from latentguard.defenses.bake import EXPORT_META
from latentguard.directions.heads import HeadLock
from latentguard.models import load_model
from tests.conftest import build_tiny


def _save_tiny(path: Path, arch: str, tok, seed: int = 0) -> str:
    build_tiny(arch, seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {"base": _save_tiny(root / "base", "llama", tiny_tokenizer),
            "finetune": _save_tiny(root / "ft", "llama", tiny_tokenizer, seed=1),
            "qwen2": _save_tiny(root / "qwen2", "qwen2", tiny_tokenizer)}
    args = ["lock", "create", "--model", dirs["base"], "--n-pairs", "6", "--k", "3", "--r-tokens", "3", "--out", str(root / "lock")]
    assert main(args) == 0
    return {**dirs, "lock": str(root / "lock")}


def test_create_apply_on_tiny_and_refuse_another_base(tiny_dirs, tmp_path, capsys):
    lock = HeadLock.load(tiny_dirs["lock"])
    assert lock.n_heads == 3 and lock.meta["dataset"]["n_pairs"] == 6 and len(lock.meta["dataset"]["questions"]) == 6
    with pytest.warns(UserWarning, match="same shapes, applying anyway"):
        assert main(["lock", "apply", "--model", tiny_dirs["finetune"], "--lock", tiny_dirs["lock"], "--out", str(tmp_path / "ft")]) == 0
    assert "fold" in capsys.readouterr().out
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["attention_bias"] is True
    code = main(["lock", "apply", "--model", tiny_dirs["qwen2"], "--lock", tiny_dirs["lock"], "--out", str(tmp_path / "q")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # one error line after the loading bars
    assert code == 2 and last.startswith("error:") and "model_type=llama, this model has model_type=qwen2" in last
    assert main(["lock", "apply", "--model", tiny_dirs["base"], "--out", str(tmp_path / "x")]) == 2
    assert "pass --lock DIR" in capsys.readouterr().err


def test_tune_writes_curve_and_plot(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "tune"
    args = ["lock", "tune", "--model", tiny_dirs["base"], "--lock", tiny_dirs["lock"], "--alphas", "2", "--n", "3",
            "--max-new-tokens", "3", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "tune.json").read_text())
    assert [c["alpha"] for c in res["curve"]] == [0.0, 2.0] and res["chosen_alpha"] in (0.0, 2.0)
    assert res["data"]["overrefusal"]["source"] == "borderline" and res["data"]["harmful"]["source"] == "rd-harmful-val"
    assert len(res["curve"][1]["harmful_examples"]) == 3 and {"prompt", "response", "refused"} <= set(res["curve"][1]["overrefusal_examples"][0])
    assert (out / "tune.svg").read_text().startswith("<svg")
    assert "chosen alpha" in capsys.readouterr().out
    n_gen = len((out / "generations.jsonl").read_text().splitlines())
    assert n_gen == 2 * 2 * 3 and main(args) == 0  # a rerun resumes: nothing generated again
    assert len((out / "generations.jsonl").read_text().splitlines()) == n_gen


def test_steer_pas_on_tiny(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "pas"
    assert main(["steer", "pas", "--model", tiny_dirs["base"], "--k", "2", "--alphas", "0,1", "--out", str(out)]) == 0
    rep = json.loads((out / "pas.json").read_text())
    assert rep["chosen_alpha"] in (0.0, 1.0) and HeadLock.load(out / "lock").meta["method"] == "pas"
    assert f"pas:{out}/lock" in capsys.readouterr().out


def test_embedded_create_and_apply_via_cli(tmp_path, capsys):
    lock_dir, model_dir = tmp_path / "lock", tmp_path / "locked"
    assert main(["lock", "create", "--n-pairs", "8", "--k", "6", "--r-tokens", "3", "--out", str(lock_dir)]) == 0
    assert "total" in capsys.readouterr().out
    lock = HeadLock.load(lock_dir)
    assert lock.n_heads == 6 and lock.meta["architecture"] == "LlamaForCausalLM" and lock.meta["system_prompt"] is None
    assert main(["lock", "apply", "--lock", str(lock_dir), "--alpha", "2", "--out", str(model_dir)]) == 0
    rec = json.loads((model_dir / EXPORT_META).read_text())
    assert rec["alpha"] == 2.0 and rec["bias_flag"] == "attention_bias" and rec["apply_s"] < 0.05
    assert rec["verify"]["max_abs_logit_diff"] <= 1e-3
    locked = load_model(str(model_dir))
    layer = lock.meta["layers"][0]
    assert torch.count_nonzero(locked.model.model.layers[layer].self_attn.o_proj.bias) > 0
    assert locked.model.model.layers[0].self_attn.q_proj.bias.abs().max() == 0
