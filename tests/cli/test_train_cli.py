"""`latentguard train` / `merge` end to end: a 5-step LoRA run on the real embedded model, a merge
whose logits match base + adapter, and the bad inputs' one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from latentguard.cli.main import main
from latentguard.hooks import encode_batch
from latentguard.models import format_prompts, load_model
from latentguard.training.logs import read_log
from tests.conftest import build_tiny

ROWS = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}."} for i in range(10)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train_cli") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_five_step_lora_run_and_merge_match_adapter_logits(tmp_path, data_file):
    run, merged = tmp_path / "run", tmp_path / "merged"
    args = ["train", "--model", "embedded", "--data", f"{data_file}:8", "--out", str(run), "--max-steps", "5",
            "--batch-size", "2", "--max-len", "96", "--lr", "1e-3", "--lora", "r=4,alpha=8,targets=q,v", "--save-steps", "5"]
    assert main(args) == 0
    log = [r for r in read_log(run / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert (run / "adapter/adapter_model.safetensors").is_file() and (run / "loss.png").stat().st_size > 1000
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    assert json.loads((merged / "latentguard.json").read_text())["base"] == "embedded"

    base = load_model("embedded")
    with_adapter = PeftModel.from_pretrained(base.model, str(run / "adapter")).eval()
    plain = load_model(str(merged))
    batch = encode_batch(base.tokenizer, format_prompts(base.tokenizer, ["What is 3 plus 4?", "Name a colour."]))
    with torch.no_grad():
        a = with_adapter(**batch.forward_kwargs()).logits
        b = plain.model(**batch.forward_kwargs()).logits
        with with_adapter.disable_adapter():
            c = with_adapter(**batch.forward_kwargs()).logits
    # float32 merge: W + BA vs the merged W differ by rounding, relative ~1e-5 of logits up to ~30
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), float((a - b).abs().max())
    assert (a - c).abs().max() > 1e-3  # the adapter changed the model, so the match is not vacuous


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "sftt"], "error: Unknown training method 'sftt'. Did you mean 'sft'"),
    (["--lora", "r=4,targets=qq"], "error: LoRA target 'qq' matches no module"),
    (["--response-column", "nope"], "error: .* has no response column 'nope'; columns: question, answer."),
])
def test_bad_inputs_print_one_line(tmp_path, tiny_dir, data_file, capsys, extra, message):
    args = ["train", "--model", str(tiny_dir), "--data", str(data_file), "--out", str(tmp_path / "r"), "--max-steps", "1", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1 and re.match(message, lines[0]), err[-500:]


def test_prompt_only_data_names_the_response_column_flag(tmp_path, tiny_dir, capsys):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\nhello\n")
    assert main(["train", "--model", str(tiny_dir), "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "pass --response-column NAME" in capsys.readouterr().err


def test_merge_refuses_a_non_run(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "is not a training run" in capsys.readouterr().err


def test_gpu_precision_flags_reach_the_run(tmp_path, tiny_dir, data_file):
    """`--model-dtype bfloat16 --bf16`: a bf16 base and bf16 autocast (CPU AMP here), recorded in meta.json."""
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data_file), "--max-steps", "1", "--batch-size", "2",
                 "--model-dtype", "bfloat16", "--bf16", "--out", str(out), "--no-plot"]) == 0
    cfg = json.loads((out / "meta.json").read_text())["config"]
    assert cfg["model_dtype"] == "bfloat16" and cfg["bf16"] is True
    assert read_log(out / "log.jsonl")[-1]["step"] == 1
