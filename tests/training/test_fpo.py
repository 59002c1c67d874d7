"""FPO and DPO on trl's DPOTrainer, on the tiny Llama with a random top-k SAE:
the feature term is 0 at step 0 and positive once a step moves the features; with α = 0 FPO is
trl's own `sigmoid_norm` DPO (same batch, and the same trajectory as a bare DPOTrainer); the
stop-gradient, the union top-k and the cached reference features behave; bad inputs fail early."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from latentguard.cli.main import main
from latentguard.directions.sae import SAEMeta, SparseAutoencoder
from latentguard.errors import ArtifactError, ConfigError, DataError
from latentguard.models import load_model
from latentguard.training import train
from latentguard.training.config import PreferenceConfig
from latentguard.training.logs import read_log
from latentguard.training.methods.fpo import (
    FPOConfig,
    FPOMethod,
    feature_drift,
    fpo_loss,
    union_topk,
)
from latentguard.training.preference import preference_dataset, read_preference_pairs

ROWS = [{"prompt": f"Say the number {i}.", "chosen": f"The number is {i}.", "rejected": f"No, {7 * i} never, go away",
         "kind": "benign"} for i in range(8)]
COMMON = {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
          "warmup_steps": 0, "disable_tqdm": True, "plot": False, "save_steps": 100, "seed": 7}


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _sae(site: str = "resid_post.1", seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(64, 128, SAEMeta(site=site, architecture="topk", k=8))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.normal_()
    return sae


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_dir):
    path = tmp_path_factory.mktemp("sae") / "sae"
    _sae().to_artifact().save(path, model=load_model(str(tiny_dir)).info)
    return path


def _fpo(tmp_path, tiny_dir, pairs_jsonl, sae_dir, name="run", **kw) -> FPOConfig:
    return FPOConfig(**{"output_dir": str(tmp_path / name), "model": str(tiny_dir), "pairs": str(pairs_jsonl),
                        "fpo_sae": str(sae_dir), "fpo_k": 8, **COMMON, **kw})


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _metric(trainer, model, batch, name):
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trainer.compute_loss(model.train(), dict(batch))
    return trainer._metrics["train"][name][-1]


def test_constraint_is_zero_at_step_zero_and_positive_after_a_step(tmp_path, tiny_dir, pairs_jsonl, sae_dir):
    res = train(_fpo(tmp_path, tiny_dir, pairs_jsonl, sae_dir, max_steps=1))
    first = read_log(tmp_path / "run/log.jsonl")[0]
    assert first["step"] == 1 and first["fpo_d_chosen"] < 1e-10 and first["fpo_d_rejected"] < 1e-10
    assert first["fpo_overlap"] == 1.0  # the untrained policy's top-k is the reference's
    batch = _batch(res.trainer)
    assert _metric(res.trainer, res.trainer.model, batch, "fpo_d_rejected") > 1e-6
    assert _metric(res.trainer, res.trainer.model, batch, "fpo_d_chosen") > 1e-6
    assert (tmp_path / "run/method/tensors.safetensors").is_file() and (tmp_path / "run/adapter").is_dir()


def test_alpha_zero_is_trls_sigmoid_norm_dpo(tmp_path, tiny_dir, pairs_jsonl, sae_dir):
    res = train(_fpo(tmp_path, tiny_dir, pairs_jsonl, sae_dir, fpo_alpha=0.0))
    trainer, model = res.trainer, res.trainer.model.train()
    batch = _batch(trainer)
    with torch.no_grad():
        ours = float(trainer.compute_loss(model, dict(batch)))
        theirs = float(DPOTrainer._compute_loss(trainer, model, {k: v for k, v in batch.items() if k != "lg_index"}, False))
    assert ours == pytest.approx(theirs, abs=1e-5) and abs(ours - 0.6931) > 1e-3  # the policy moved: not log 2
    # A bare trl DPOTrainer (sigmoid_norm, precomputed reference) follows the same trajectory.
    loaded = load_model(str(tiny_dir))
    bare = DPOTrainer(model=loaded.model, processing_class=loaded.tokenizer,
                      train_dataset=preference_dataset(read_preference_pairs(pairs_jsonl)).remove_columns("lg_index"),
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"),
                      args=DPOConfig(output_dir=str(tmp_path / "bare"), loss_type="sigmoid_norm", precompute_ref_log_probs=True,
                                     report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                                     save_strategy="no", logging_steps=1, adam_beta2=0.95, weight_decay=1e-4,
                                     lr_scheduler_type="constant_with_warmup", max_length=1024,
                                     **{k: v for k, v in COMMON.items() if k not in ("plot", "save_steps")}))
    bare.train()
    ours_log = [r["loss"] for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r]
    theirs_log = [r["loss"] for r in bare.state.log_history if "loss" in r]
    assert ours_log == pytest.approx(theirs_log, abs=1e-5) and len(ours_log) == 2


def test_stop_gradient_on_the_chosen_side_and_alpha_weight():
    torch.manual_seed(0)
    b, m = 3, 20
    zeros = torch.zeros(b)
    feats = [torch.rand(b, m, requires_grad=True) for _ in range(2)]
    refs = [torch.rand(b, m) for _ in range(2)]
    loss = fpo_loss(zeros, zeros, zeros, zeros, *feats, *refs, beta=0.1, alpha=0.5, k=4)["loss"]
    grad_w, grad_l = torch.autograd.grad(loss, feats, allow_unused=True)
    assert grad_w is None or grad_w.abs().max() == 0  # sg[D(x, y_w)]: no gradient through the chosen side
    assert grad_l is not None and grad_l.abs().max() > 0
    (d_w, _), (d_l, _) = (feature_drift(f.detach(), r, 4) for f, r in zip(feats, refs))
    expect = -torch.nn.functional.logsigmoid(-0.5 * 0.1 * (d_l - d_w)).mean()  # u = 0 − αβ(D_l − D_w)
    assert float(loss) == pytest.approx(float(expect), abs=1e-6)


def test_union_topk_equals_brute_force():
    torch.manual_seed(1)
    c, r = torch.rand(5, 30), torch.rand(5, 30)
    mask = union_topk(c, r, 6)
    for i in range(5):
        brute = set(sorted(range(30), key=lambda j: -c[i, j])[:6]) | set(sorted(range(30), key=lambda j: -r[i, j])[:6])
        assert set(mask[i].nonzero().flatten().tolist()) == brute
    d, size = feature_drift(c, r, 6)
    assert torch.allclose(d, ((c - r).square() * mask).sum(1) / mask.sum(1)) and torch.equal(size, mask.sum(1))


def test_resume_restores_the_cached_reference_features(tmp_path, tiny_dir, pairs_jsonl, sae_dir):
    first = train(_fpo(tmp_path, tiny_dir, pairs_jsonl, sae_dir, max_steps=1, save_steps=1, fpo_ref_storage="topk",
                       fpo_ref_topk=16))
    cached = {k: v.clone() for k, v in first.trainer.method._ref.items()}
    assert set(cached) == {"chosen_idx", "chosen_val", "rejected_idx", "rejected_val"}  # kept sparse in memory
    assert all(v.shape == (8, 16) for v in cached.values())
    # a batch's dense rows are the full reference's top 16 latents, zeros elsewhere
    full = train(_fpo(tmp_path, tiny_dir, pairs_jsonl, sae_dir, name="full", max_steps=1, save_steps=1)).trainer.method
    rows = torch.tensor([5, 0, 3])
    for side in ("chosen", "rejected"):
        ref = full._ref[side][rows]
        top = ref.topk(16, dim=1)
        expected = torch.zeros_like(ref).scatter(1, top.indices, top.values)
        assert torch.allclose(first.trainer.method._ref_rows(side, rows), expected)
    resumed = train(_fpo(tmp_path, tiny_dir, pairs_jsonl, sae_dir, max_steps=2, resume=True, fpo_ref_storage="topk",
                         fpo_ref_topk=16))
    assert all(torch.equal(resumed.trainer.method._ref[k], cached[k]) for k in cached)
    assert [r["step"] for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r] == [1, 2]


def test_reference_features_are_read_during_trls_reference_pass(tmp_path, tiny_dir, sae_dir, monkeypatch):
    """c̄_ref comes from trl's own precompute forward (no second pass) and equals a separate pass."""
    pairs = tmp_path / "own.jsonl"  # rows no other test uses: trl's cached reference log-probs cannot hit
    pairs.write_text("".join(json.dumps({**r, "prompt": f"Count to {i}."}) + "\n" for i, r in enumerate(ROWS)))
    read = train(_fpo(tmp_path, tiny_dir, pairs, sae_dir, name="read", max_steps=1)).trainer.method
    assert json.loads((tmp_path / "read/method/meta.json").read_text())["source"] == "trl_reference_pass"
    monkeypatch.setattr(FPOMethod, "reference_sites", lambda self: [])
    own = train(_fpo(tmp_path, tiny_dir, pairs, sae_dir, name="own", max_steps=1)).trainer.method
    assert json.loads((tmp_path / "own/method/meta.json").read_text())["source"] == "own_pass"
    for side in ("chosen", "rejected"):
        assert own._ref[side].abs().sum() > 0 and torch.allclose(read._ref[side], own._ref[side], atol=1e-5)


def test_dpo_method_is_trls_dpo(tmp_path, tiny_dir, pairs_jsonl):
    res = train(PreferenceConfig(output_dir=str(tmp_path / "dpo"), model=str(tiny_dir), pairs=str(pairs_jsonl), **COMMON))
    log = [r for r in read_log(tmp_path / "dpo/log.jsonl") if "loss" in r]
    assert res.trainer.loss_types == ["sigmoid"] and not res.trainer.precompute_ref_logps
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and log[1]["loss"] < log[0]["loss"]
    assert json.loads((tmp_path / "dpo/meta.json").read_text())["data"][0]["rows"] == 8


def test_pairs_file_with_missing_fields(tmp_path, tiny_dir, sae_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"record 2: missing or empty 'rejected'; every record needs prompt, chosen"):
        read_preference_pairs(bad)
    with pytest.raises(ConfigError, match="No preference pairs; pass --pairs FILE"):
        PreferenceConfig(output_dir=str(tmp_path / "x"))


def test_sae_of_another_layer_or_model_is_refused(tmp_path, tiny_dir, other_tiny_dir, pairs_jsonl, sae_dir):
    with pytest.raises(ArtifactError, match=r"was trained at resid_post.1, but --fpo-layer is 0; pass --fpo-layer 1"):
        train(_fpo(tmp_path, tiny_dir, pairs_jsonl, sae_dir, fpo_layer=0))
    with pytest.raises(ArtifactError, match="was built on model fingerprint"):
        train(_fpo(tmp_path, other_tiny_dir, pairs_jsonl, sae_dir, name="other"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "fpo", "--pairs", "{bad}", "--fpo-sae", "{sae}"], r"error: .*record 2: missing or empty 'rejected'"),
    (["--method", "fpo", "--pairs", "{pairs}"], r"error: FPO needs an SAE; pass --fpo-sae DIR"),
    (["--method", "fpo", "--pairs", "{pairs}", "--fpo-sae", "{sae}", "--data", "gsm8k"],
     r"error: --data does not apply to method 'fpo'"),
    (["--method", "sft", "--data", "{pairs}", "--pairs", "{pairs}"], r"error: --pairs does not apply to method 'sft'"),
])
def test_cli_bad_inputs_print_one_line(tmp_path, tiny_dir, pairs_jsonl, sae_dir, capsys, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    fill = {"bad": str(bad), "pairs": str(pairs_jsonl), "sae": str(sae_dir)}
    args = ["train", "--model", str(tiny_dir), "--out", str(tmp_path / "r"), "--max-steps", "1",
            *[a.format(**fill) for a in extra]]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1 and re.match(message, lines[0]), err[-500:]


def test_cli_fpo_run(tmp_path, tiny_dir, pairs_jsonl, sae_dir):
    args = ["train", "--method", "fpo", "--model", str(tiny_dir), "--pairs", str(pairs_jsonl), "--fpo-sae", str(sae_dir),
            "--fpo-k", "8", "--out", str(tmp_path / "cli"), "--max-steps", "1", "--batch-size", "4", "--grad-accum", "1",
            "--lr", "1e-2", "--warmup-steps", "0", "--no-plot"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "cli/meta.json").read_text())
    assert meta["method"] == "fpo" and meta["config"]["loss_type"] == ["sigmoid_norm"]
    assert meta["config"]["precompute_ref_log_probs"] and meta["config"]["fpo_alpha"] == 0.5
    assert "fpo_d_rejected" in read_log(tmp_path / "cli/log.jsonl")[0]


def test_spec_defaults():
    cfg = FPOConfig(output_dir="x", pairs="p", fpo_sae="s")
    assert (cfg.beta, cfg.fpo_alpha, cfg.fpo_k, cfg.learning_rate, cfg.warmup_steps) == (0.1, 0.5, 50, 5e-7, 150)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay, cfg.max_grad_norm) == (0.9, 0.95, 1e-4, 1.0)
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 32
    with pytest.raises(ConfigError, match="FPO is the sigmoid_norm loss"):
        FPOConfig(output_dir="x", pairs="p", fpo_sae="s", loss_type="ipo")



