"""The training core on the tiny Llama: one step learns, prompts carry no loss, resume is exact,
bad inputs fail with one-line errors naming the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from latentguard.errors import ArtifactError, ConfigError
from latentguard.models import format_prompts
from latentguard.training import TrainConfig, train
from latentguard.training.logs import read_log
from tests.conftest import build_tiny


def _cfg(tmp_path, tiny_dir, pairs_file, **kw) -> TrainConfig:
    base = {"output_dir": str(tmp_path / "run"), "model": str(tiny_dir), "data": [str(pairs_file)], "max_steps": 1,
                "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_steps": 100, "disable_tqdm": True, "plot": False}
    return TrainConfig(**{**base, **kw})


def _batch(trainer, n=4):
    rows = [trainer.train_dataset[i] for i in range(n)]
    batch = trainer.data_collator(rows)
    batch.pop("lg_index")
    return batch


def _loss(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def test_one_sft_step_lowers_the_loss_on_its_batch(tmp_path, tiny_dir, pairs_file):
    cfg = _cfg(tmp_path, tiny_dir, pairs_file, per_device_train_batch_size=16, learning_rate=3e-2)
    res = train(cfg)
    batch = _batch(res.trainer, 16)  # max_steps=1 with batch 16 = the whole set
    before = _loss(build_tiny("llama"), batch)
    after = _loss(res.trainer.model.eval(), batch)
    assert after < before - 1e-3
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    log = read_log(tmp_path / "run/log.jsonl")
    assert log[0]["step"] == 1 and "loss" in log[0] and "learning_rate" in log[0]


def test_prompt_tokens_carry_no_loss(tmp_path, tiny_dir, pairs_file, tiny_tokenizer):
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, max_steps=0, num_train_epochs=0))
    row = res.trainer.train_dataset[0]
    n_prompt = len(tiny_tokenizer(format_prompts(tiny_tokenizer, [row["prompt"][0]["content"]])[0],
                                  add_special_tokens=False)["input_ids"])
    labels = row["labels"]
    assert all(label == -100 for label in labels[:n_prompt])
    assert labels[n_prompt:] == row["input_ids"][n_prompt:]  # response + <|im_end|> carry loss
    batch = _batch(res.trainer)
    model = res.trainer.model.eval()
    base = _loss(model, batch)
    prompt_pos = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    changed = dict(batch, labels=torch.where(prompt_pos, (batch["input_ids"] + 1) % 200, batch["labels"]))
    assert _loss(model, changed) != pytest.approx(base, abs=1e-4)  # the probe is sensitive: unmasked prompts count
    with torch.no_grad():
        trl_loss = float(res.trainer.compute_loss(model, dict(batch, lg_index=torch.arange(4))))
    assert trl_loss == pytest.approx(base, abs=1e-5)  # the trainer's loss is exactly the masked one


def test_resume_gives_the_same_next_step_loss(tmp_path, tiny_dir, pairs_file):
    full = _cfg(tmp_path, tiny_dir, pairs_file, output_dir=str(tmp_path / "a"), max_steps=4, save_steps=2,
                save_total_limit=None)
    train(full)
    ref = {r["step"]: r["loss"] for r in read_log(tmp_path / "a/log.jsonl") if "loss" in r}
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b, ignore=shutil.ignore_patterns("checkpoint-4", "adapter"))
    train(_cfg(tmp_path, tiny_dir, pairs_file, output_dir=str(b), max_steps=4, save_steps=2, resume=True))
    got = {r["step"]: r["loss"] for r in read_log(b / "log.jsonl") if "loss" in r}
    assert sorted(got) == [1, 2, 3, 4]  # no duplicate lines after the resume
    assert got[3] == pytest.approx(ref[3], abs=1e-6) and got[4] == pytest.approx(ref[4], abs=1e-6)


def test_resume_refuses_another_models_checkpoint(tmp_path, tiny_dir, other_tiny_dir, pairs_file):
    train(_cfg(tmp_path, tiny_dir, pairs_file, max_steps=1, save_steps=1))
    with pytest.raises(ArtifactError, match="was trained on .*pass --model"):
        train(_cfg(tmp_path, other_tiny_dir, pairs_file, max_steps=2, resume=True))


def test_unknown_method_names_the_known_ones(tmp_path, tiny_dir, pairs_file):
    with pytest.raises(ConfigError, match="Unknown training method 'sfft'. Did you mean 'sft'"):
        train(_cfg(tmp_path, tiny_dir, pairs_file, method="sfft"))


def test_lora_target_matching_no_module(tmp_path, tiny_dir, pairs_file):
    with pytest.raises(ConfigError, match="LoRA target 'query' matches no module.*q_proj"):
        train(_cfg(tmp_path, tiny_dir, pairs_file, lora="r=4,targets=q,query"))


def test_existing_output_needs_resume_or_overwrite(tmp_path, tiny_dir, pairs_file):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/x").write_text("x")
    from latentguard.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="--resume to continue it, --overwrite"):
        train(_cfg(tmp_path, tiny_dir, pairs_file))


def test_full_fine_tune_writes_a_plain_model(tmp_path, tiny_dir, pairs_file):
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, full=True, max_steps=1))
    assert (tmp_path / "run/model/model.safetensors").is_file()
    meta = json.loads((tmp_path / "run/meta.json").read_text())
    assert meta["full"] and meta["lora"] is None and res.trainer.model.model.layers[0].self_attn.q_proj.weight.requires_grad


def test_lora_init_follows_the_config_seed_not_the_global_rng(tmp_path, tiny_dir, pairs_file):
    def lora_a(name: str, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(len(name) * 1000 + 7)  # a different global RNG state before every build
        res = train(_cfg(tmp_path, tiny_dir, pairs_file, output_dir=str(tmp_path / name), max_steps=0,
                         num_train_epochs=0, seed=seed))
        return {k: v.detach().clone() for k, v in res.trainer.model.named_parameters() if "lora_A" in k}

    a, b, c = lora_a("a", 1), lora_a("bb", 1), lora_a("ccc", 2)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_bfloat16_base_trains_float32_lora_and_merges_in_its_dtype(tmp_path, tiny_dir, pairs_file):
    """--model-dtype bfloat16: half the base's weight memory; the adapter stays float32 and learns; merging
    reloads the base in bfloat16, so the fingerprint check of the run's base passes."""
    from latentguard.models import load_model
    from latentguard.training.merge import merge_run

    res = train(_cfg(tmp_path, tiny_dir, pairs_file, model_dtype="bfloat16", max_steps=2))
    params = dict(res.trainer.model.named_parameters())
    base_w = next(v for k, v in params.items() if k.endswith("q_proj.base_layer.weight"))
    lora = {k: v for k, v in params.items() if "lora_" in k}
    assert base_w.dtype == torch.bfloat16 and not base_w.requires_grad
    assert lora and all(v.dtype == torch.float32 and v.requires_grad for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the adapter learned (B starts at 0)
    meta = json.loads((tmp_path / "run/meta.json").read_text())
    assert meta["config"]["model_dtype"] == "bfloat16"
    assert meta["model"]["fingerprint"] == load_model(str(tiny_dir), dtype="bfloat16").info.fingerprint
    merged = load_model(str(merge_run(tmp_path / "run", tmp_path / "merged")))
    assert merged.info.fingerprint != load_model(str(tiny_dir)).info.fingerprint
    with pytest.raises(ConfigError, match="--model-dtype 'int8' is not one of float32, bfloat16, float16"):
        _cfg(tmp_path, tiny_dir, pairs_file, model_dtype="int8", output_dir=str(tmp_path / "bad"))
