"""Run by tests/training/test_ddp.py under `accelerate launch --cpu --num_processes 2`.

Trains the tiny model through `latentguard.training.train` and saves this rank's trainable
weights to OUT/rank{R}.safetensors, so the test can compare the ranks.
Args: MODEL_DIR DATA_FILE OUT_DIR
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentguard.training import TrainConfig, train

torch.set_num_threads(1)
model_dir, data, out = sys.argv[1:4]
cfg = TrainConfig(output_dir=str(Path(out) / "run"), model=model_dir, data=[data], max_steps=3,
                  per_device_train_batch_size=2, learning_rate=1e-2, save_steps=100, disable_tqdm=True, plot=False)
result = train(cfg)
state = result.trainer.accelerator.unwrap_model(result.trainer.model).state_dict()
trainable = {n for n, p in result.trainer.accelerator.unwrap_model(result.trainer.model).named_parameters() if p.requires_grad}
tensors = {n: t.detach().cpu().contiguous() for n, t in state.items() if n in trainable}
meta = {"world_size": str(cfg.world_size), "backend": str(torch.distributed.get_backend() if torch.distributed.is_initialized() else "none")}
save_file(tensors, str(Path(out) / f"rank{cfg.process_index}.safetensors"), metadata=meta)

# Tear the gloo group down before exit: leaving it to interpreter shutdown can abort a rank
# ("terminate called without an active exception") while the other still holds its sockets.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
