"""The method extension points, exercised by a test-only method:
(a) a hidden-state loss from the same forward, whose gradient reaches the LoRA weights;
(b) per-module learning rates and freezing via optimizer groups;
(c) an extra trainable module, saved with checkpoints;
(d) reference statistics prepared before training, saved as an artefact, restored on resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from latentguard.artifacts import Artifact
from latentguard.hooks import count_hooks
from latentguard.training import (
    METHODS,
    TrainBatch,
    TrainConfig,
    TrainingMethod,
    capture_live,
    train,
)
from latentguard.training.logs import read_log
from latentguard.training.trainer import MODULES_FILE, tapped_model

SITE = "resid_post.0"


@dataclass
class ProbeConfig(TrainConfig):
    probe_alpha: float = field(default=1.0, metadata={"help": "weight of the hidden-state term"})


@METHODS.register("test_probe")
class ProbeMethod(TrainingMethod):
    """Anchors each sample's mean projection on a direction to its pre-training value + 1 (so the
    term is non-zero at step 0), trains a linear probe on the same hidden states, freezes layer-1
    LoRA and gives the probe a 10x learning rate."""

    config_cls = ProbeConfig
    prepared_calls = 0

    def sites(self, model: nn.Module) -> list[str]:
        return [SITE]

    def add_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        self.probe = nn.Linear(model.config.hidden_size, 1)
        return {"probe": self.probe}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        for n, p in lora:
            if ".layers.1." in n:
                p.requires_grad_(False)
        return [{"params": [p for _, p in lora if p.requires_grad]},
                {"params": list(self.probe.parameters()), "lr": 10 * self.config.learning_rate}]

    @torch.no_grad()
    def prepare(self, model: nn.Module, dataset: Any, collate: Any) -> Artifact:
        type(self).prepared_calls += 1
        torch.manual_seed(0)
        d = model.config.hidden_size
        self.direction = nn.functional.normalize(torch.randn(1, d), dim=-1)
        anchors = torch.zeros(len(dataset))
        for start in range(0, len(dataset), 8):
            rows = [dataset[i] for i in range(start, min(start + 8, len(dataset)))]
            batch = collate(rows)
            index = batch.pop("lg_index")
            with capture_live(tapped_model(model), [SITE]) as hidden:
                model(**batch)
            anchors[index] = self._mean_z(hidden[SITE], batch["labels"] != -100)
        self.anchors = anchors
        return Artifact(kind="test_probe_reference", tensors={"direction": self.direction, "anchors": anchors})

    def restore(self, artifact: Artifact) -> None:
        self.direction, self.anchors = artifact.tensors["direction"], artifact.tensors["anchors"]

    def _mean_z(self, h: Tensor, mask: Tensor) -> Tensor:
        z = torch.einsum("btd,d->bt", h.float(), self.direction[0].to(h.device))
        return (z * mask).sum(1) / mask.sum(1).clamp(min=1)

    def loss_terms(self, hidden: dict[str, Tensor], batch: TrainBatch, model: nn.Module) -> dict[str, Tensor]:
        h, mask = hidden[SITE], batch.response_mask
        target = self.anchors.to(h.device)[batch.index] + 1.0
        anchor = (self._mean_z(h, mask) - target).square().mean()
        probe = self.probe(h[mask]).square().mean()
        return {"anchor": self.config.probe_alpha * anchor, "probe_reg": probe}


def _cfg(tmp_path, tiny_dir, pairs_file, **kw) -> ProbeConfig:
    base = {"output_dir": str(tmp_path / "run"), "model": str(tiny_dir), "data": [str(pairs_file)], "method": "test_probe",
                "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_steps": 1, "disable_tqdm": True,
                "plot": False, "lora": "r=4,alpha=8,targets=q,v,down"}
    return ProbeConfig(**{**base, **kw})


def _lora_grads(trainer, batch) -> dict[str, Tensor]:
    model = trainer.model
    model.zero_grad()
    trainer.compute_loss(model.train(), dict(batch)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None}


def test_hidden_state_loss_gradient_reaches_the_lora_weights(tmp_path, tiny_dir, pairs_file):
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, max_steps=0, num_train_epochs=0))
    trainer = res.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with_term = _lora_grads(trainer, batch)
    trainer.method.config.probe_alpha = 0.0
    without = _lora_grads(trainer, batch)
    layer0 = [n for n in with_term if ".layers.0." in n]
    assert layer0 and any((with_term[n] - without[n]).abs().max() > 1e-6 for n in layer0)
    assert count_hooks(tapped_model(trainer.model)) == 0  # live taps removed after every forward


def test_extension_points_train_save_and_resume(tmp_path, tiny_dir, pairs_file):
    res = train(_cfg(tmp_path, tiny_dir, pairs_file))
    model, opt = res.trainer.model, res.trainer.optimizer
    assert [g["lr"] for g in opt.param_groups][1] == pytest.approx(10 * opt.param_groups[0]["lr"])
    frozen = [p for n, p in model.named_parameters() if "lora_B" in n and ".layers.1." in n]
    assert frozen and all(not p.requires_grad and p.abs().max() == 0 for p in frozen)  # B starts at 0, never trained
    moved = [p for n, p in model.named_parameters() if "lora_B" in n and ".layers.0." in n]
    assert any(p.abs().max() > 0 for p in moved)
    art = Artifact.load(tmp_path / "run/method", expect="test_probe_reference")
    assert art.tensors["anchors"].shape == (16,)
    saved = load_file(str(tmp_path / "run/checkpoint-2" / MODULES_FILE))
    assert torch.equal(saved["probe.weight"], model.latentguard_modules.probe.weight.detach())
    log = [r for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r]
    assert all("anchor" in r and "probe_reg" in r for r in log)
    calls = ProbeMethod.prepared_calls
    res2 = train(_cfg(tmp_path, tiny_dir, pairs_file, max_steps=3, resume=True))
    assert ProbeMethod.prepared_calls == calls  # restored from the artefact, not recomputed
    assert torch.equal(res2.trainer.method.anchors, art.tensors["anchors"])
