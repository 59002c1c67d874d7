"""ProCon on the tiny Llama: zero penalty at step 0 with a gradient that reaches the trained
weights, α ordering of the projection drift, α = 0 = SFT, warm-up schedule and phase reset,
logging, the cached reference, LoRA and full fine-tuning, and the bad inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import set_seed

from latentguard.artifacts import Artifact
from latentguard.cli.main import main
from latentguard.errors import ConfigError
from latentguard.hooks import count_hooks
from latentguard.training import (
    METHODS,
    TrainConfig,
    layer_projections,
    projection_loss,
    projection_penalty,
    train,
)
from latentguard.training.logs import read_log
from latentguard.training.methods.procon import (
    ProConConfig,
    parse_layers,
    procon_alpha_at,
    response_positions,
)
from latentguard.training.trainer import tapped_model
from tests.conftest import REPO


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("procon_prompts")
    harmful, harmless = d / "harmful.json", d / "harmless.json"
    harmful.write_text(json.dumps([{"instruction": f"How do I hurt person {i} with a weapon?"} for i in range(8)]))
    harmless.write_text(json.dumps([{"instruction": f"What is {i} plus {i}?"} for i in range(8)]))
    return harmful, harmless


def _cfg(tmp_path, tiny_dir, pairs_file, prompts, name="run", **kw) -> ProConConfig:
    base = {"output_dir": str(tmp_path / name), "model": str(tiny_dir), "data": [str(pairs_file)], "method": "procon",
            "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_steps": 100,
            "disable_tqdm": True, "plot": False, "lora": "r=4,alpha=8,targets=q,k,v,o", "procon_harmful": str(prompts[0]),
            "procon_harmless": str(prompts[1]), "seed": 0}
    return ProConConfig(**{**base, **kw})


def _grads(trainer, batch) -> dict[str, torch.Tensor]:
    model = trainer.model
    model.zero_grad()
    trainer.compute_loss(model.train(), dict(batch)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_penalty_is_zero_at_step_0_and_its_gradient_reaches_the_trained_weights(tmp_path, tiny_dir, pairs_file, prompts):
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, max_steps=0, num_train_epochs=0, procon_alpha=1.0))
    trainer, method = res.trainer, res.trainer.method
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    at_zero = _grads(trainer, batch)
    assert trainer._metrics["train"]["procon_raw"][-1] == 0.0  # reference samples, θ = θ0 (float noise in the dead zone)
    method.config.procon_alpha = 0.0
    plain = _grads(trainer, batch)
    assert all(torch.equal(at_zero[n], plain[n]) for n in plain)  # and the term's gradient is 0 (spec §9)
    method.config.procon_alpha = 1.0
    drift = method.drift(trainer.model, trainer.train_dataset, trainer.data_collator)  # cache vs recompute (spec: 1e-4)
    assert float(drift.abs().max()) < 1e-4
    with torch.no_grad():  # move off the anchors: LoRA B starts at 0, so nudge it
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    with_term = _grads(trainer, batch)
    assert trainer._metrics["train"]["procon_raw"][-1] > 1e-4
    method.config.procon_alpha = 0.0
    without = _grads(trainer, batch)
    layer0 = [n for n in with_term if "lora_B" in n and ".layers.0." in n]  # resid_pre.1 reads block 0's output
    assert layer0 and any((with_term[n] - without[n]).abs().max() > 1e-6 for n in layer0)
    assert count_hooks(tapped_model(trainer.model)) == 0


def test_large_alpha_keeps_projections_closer_to_the_reference(tmp_path, tiny_dir, pairs_file, prompts):
    drifts = {}
    for alpha in (0.0, 20.0):
        res = train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, name=f"a{alpha}", max_steps=8, procon_alpha=alpha,
                         learning_rate=2e-2))
        t = res.trainer
        drifts[alpha] = float(t.method.drift(t.model, t.train_dataset, t.data_collator).mean())
    assert drifts[0.0] > 1e-3  # plain training moves the projections
    assert drifts[20.0] < drifts[0.0]


def test_alpha_zero_reproduces_the_sft_loss_trajectory(tmp_path, tiny_dir, pairs_file, prompts):
    common = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "disable_tqdm": True, "plot": False,
              "lora": "r=4,alpha=8,targets=q,k,v,o", "seed": 0, "save_steps": 100, "model": str(tiny_dir),
              "data": [str(pairs_file)]}
    set_seed(0)  # the LoRA init draws from the global RNG
    train(TrainConfig(output_dir=str(tmp_path / "sft"), method="sft", **common))
    set_seed(0)
    train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, name="p0", procon_alpha=0.0, **common))
    sft = [r["loss"] for r in read_log(tmp_path / "sft/log.jsonl") if "loss" in r]
    p0 = [r for r in read_log(tmp_path / "p0/log.jsonl") if "loss" in r]
    assert [r["loss"] for r in p0] == sft
    assert all(r["procon"] == 0 and r["procon_alpha"] == 0 for r in p0)
    assert p0[-1]["procon_drift"] > 0  # α = 0 still monitors the drift


def test_warmup_schedule_values():
    assert [procon_alpha_at(s, 0.0, 4, 2.0, "step") for s in range(6)] == [2, 2, 2, 2, 0, 0]
    assert [procon_alpha_at(s, 0.0, 4, 2.0, "linear") for s in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    cos = [procon_alpha_at(s, 0.1, 4, 2.0, "cosine") for s in range(5)]
    assert cos[0] == pytest.approx(2.0) and cos[2] == pytest.approx(1.05)
    assert cos[1] == pytest.approx(0.1 + 1.9 * 0.5 * (1 + math.cos(math.pi / 4))) and cos[4] == 0.1
    assert [procon_alpha_at(s, 0.2) for s in (0, 7)] == [0.2, 0.2]  # no warm-up: constant (ProCon_s)


def test_warmup_in_training_logs_alpha_per_step_and_resets_the_optimizer(tmp_path, tiny_dir, pairs_file, prompts):
    # 16 rows, batch 4: 4 steps per epoch; a half-epoch warm-up = 2 steps
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, max_steps=5, procon_alpha=0.0, procon_warmup_epochs=0.5,
                     procon_warmup_alpha=2.0, procon_decay="linear"))
    log = [r for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r]
    assert [r["procon_alpha"] for r in log] == [2.0, 1.0, 0.0, 0.0, 0.0]  # row of step k: the forward of step k-1
    assert log[0]["procon"] == 0.0 and log[1]["procon"] == pytest.approx(log[1]["procon_raw"])
    opt = res.trainer.optimizer
    steps = {int(s["step"]) for s in getattr(opt, "optimizer", opt).state.values()}
    assert steps == {3}  # cleared after step 2: a fresh AdamW for steps 3-5
    res2 = train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, name="noreset", max_steps=5, procon_alpha=0.0,
                      procon_warmup_steps=2, procon_phase_reset=False))
    opt2 = res2.trainer.optimizer
    assert {int(s["step"]) for s in getattr(opt2, "optimizer", opt2).state.values()} == {5}


def test_run_logs_penalty_and_drift_and_caches_the_reference(tmp_path, tiny_dir, pairs_file, prompts):
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, max_steps=2, save_steps=1))
    log = [r for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r]
    keys = {"procon", "procon_raw", "procon_alpha", "procon_drift", "procon_drift/0", "procon_drift/1"}
    assert all(keys <= set(r) for r in log)
    art = Artifact.load(tmp_path / "run/method", expect="procon_reference")
    ds = res.trainer.train_dataset
    n_tokens = int((res.trainer.data_collator([ds[i] for i in range(len(ds))])["labels"] != -100).sum())
    assert art.tensors["anchors"].shape == (2, n_tokens) and art.tensors["anchors"].dtype == torch.float32
    assert art.meta["zero_layers"] == [0]  # layer 0 reads the same template token for every prompt
    assert float(art.tensors["directions"][0].abs().max()) == 0
    assert torch.allclose(art.tensors["directions"][1].norm(), torch.tensor(1.0))
    # the run's method/ dir is a direction source for the next run; resume restores instead of recomputing
    res2 = train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, name="reuse", procon_directions=str(tmp_path / "run/method"),
                      procon_harmful=None, procon_harmless=None))
    assert torch.equal(res2.trainer.method._directions, art.tensors["directions"])
    res3 = train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, max_steps=3, save_steps=1, resume=True))
    assert torch.equal(res3.trainer.method._anchors, art.tensors["anchors"])


def test_full_fine_tuning_and_one_layer(tmp_path, tiny_dir, pairs_file, prompts):
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, full=True, lora=TrainConfig.lora, max_steps=0,
                     num_train_epochs=0, procon_layers="last", procon_alpha=1.0, procon_norm="sq"))
    trainer = res.trainer
    assert trainer.method.layers == [1]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        trainer.model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    g1 = _grads(trainer, batch)
    trainer.method.config.procon_alpha = 0.0
    g0 = _grads(trainer, batch)
    name = "model.layers.0.self_attn.v_proj.weight"
    assert (g1[name] - g0[name]).abs().max() > 1e-7


def test_split_projections_equal_the_stacked_loss():
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    direction = torch.randn(3, 8, generator=g)
    ref = torch.randn(3, 2, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    z = layer_projections(hidden, direction)
    assert torch.allclose(projection_penalty(z, mask, ref), projection_loss(torch.stack(hidden), direction, mask, ref))
    near = ref + 1e-5 * torch.randn(ref.shape, generator=g)  # float noise: inside the dead zone
    assert float(projection_penalty(near, mask, ref, tolerance=1e-4)) == 0.0
    far = ref + 1.0
    shrunk = (1.0 - 1e-2 * (1 + ref.abs()))[:, mask].sum() / 2
    assert float(projection_penalty(far, mask, ref, tolerance=1e-2)) == pytest.approx(float(shrunk), rel=1e-5)
    # mean: one number per (layer, masked token); 5 masked tokens x 3 layers, sum = 2 x batch mean
    total = (z - ref).abs()[:, mask].sum()
    assert float(projection_penalty(z, mask, ref, reduce="mean")) == pytest.approx(float(total / (3 * 5)), rel=1e-6)
    assert float(projection_penalty(z, mask, ref)) == pytest.approx(float(total / 2), rel=1e-6)
    with pytest.raises(ConfigError, match="reduce='max'"):
        projection_penalty(z, mask, ref, reduce="max")
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert response_positions(labels, "target").tolist() == [[False, False, True, True, False]]
    assert response_positions(labels, "predicting").tolist() == [[False, True, True, False, False]]


def test_layers_parsing():
    assert parse_layers("all", 4) == [0, 1, 2, 3] and parse_layers("last", 4) == [3]
    assert parse_layers("1,-1", 4) == [1, 3] and parse_layers("1:3", 4) == [1, 2]


def test_bad_inputs(tmp_path, tiny_dir, pairs_file, prompts):
    with pytest.raises(ConfigError, match="ProCon has no direction source"):
        ProConConfig(output_dir=str(tmp_path / "x"), data=[str(pairs_file)], method="procon", data_dir=None)
    with pytest.raises(ConfigError, match=r"procon_alpha=-0.5; use a finite value >= 0"):
        _cfg(tmp_path, tiny_dir, pairs_file, prompts, procon_alpha=-0.5)
    with pytest.raises(ConfigError, match=r"procon_warmup_alpha=-1"):
        _cfg(tmp_path, tiny_dir, pairs_file, prompts, procon_warmup_alpha=-1.0)
    with pytest.raises(ConfigError, match="layers \\[5\\] out of range for a model with 2 layers; use 0..1"):
        train(_cfg(tmp_path, tiny_dir, pairs_file, prompts, procon_layers="0,5"))
    with pytest.raises(ConfigError, match="procon_layers='x'"):
        _cfg(tmp_path, tiny_dir, pairs_file, prompts, procon_layers="x")
    with pytest.raises(ConfigError, match="procon_norm='l1'; use one of abs, sq"):
        _cfg(tmp_path, tiny_dir, pairs_file, prompts, procon_norm="l1")
    with pytest.raises(ConfigError, match="give the warm-up length once"):
        _cfg(tmp_path, tiny_dir, pairs_file, prompts, procon_warmup_steps=2, procon_warmup_epochs=1.0)
    with pytest.raises(ConfigError, match="does not exist"):
        _cfg(tmp_path, tiny_dir, pairs_file, prompts, procon_harmful=str(tmp_path / "nope.json"))
    assert METHODS.get("procon").config_cls is ProConConfig


def test_cli_rejects_negative_alpha(tmp_path, tiny_dir, pairs_file, capsys):
    rc = main(["train", "--model", str(tiny_dir), "--data", str(pairs_file), "--method", "procon", "--procon-alpha", "-1",
               "--out", str(tmp_path / "cli")])
    assert rc == 2 and "procon_alpha=-1.0" in capsys.readouterr().err


def test_procon_and_mllr_under_two_rank_ddp(tmp_path, tiny_dir, pairs_file, prompts):
    """`accelerate launch` with the shipped CPU DDP config: both ranks end with identical, trained weights."""
    from tests.training.test_ddp import _free_port
    from tests.training.test_mllr import _scores

    scores = _scores(tmp_path / "scores", tiny_dir)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/ddp_cpu.yaml"),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(Path(__file__).with_name("ddp_method_worker.py")), str(tiny_dir), str(pairs_file), str(prompts[0]),
           str(prompts[1]), str(scores), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("procon", "mllr"):
        ranks = [load_file(str(tmp_path / f"{method}-rank{r}.safetensors")) for r in (0, 1)]
        with safe_open(str(tmp_path / f"{method}-rank1.safetensors"), "pt") as f:
            assert f.metadata() == {"world_size": "2"}
        assert ranks[0].keys() == ranks[1].keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
        assert any(float(v.abs().max()) > 0 for k, v in ranks[0].items() if "lora_B" in k)
    log = [r for r in read_log(tmp_path / "run-procon/log.jsonl") if "loss" in r]
    assert [r["procon_alpha"] for r in log] == [3.0, 1.0, 1.0]
