"""Run by tests/training/test_procon.py under `accelerate launch` (2 CPU processes, gloo).

Trains the tiny model with `procon` (warm-up, then α = 1) and with `mllr` (λ = 0.1, given
scores) and saves this rank's trainable weights to OUT/<method>-rank{R}.safetensors.
Args: MODEL_DIR DATA_FILE HARMFUL_FILE HARMLESS_FILE SCORES_DIR OUT_DIR
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentguard.training import METHODS, train

torch.set_num_threads(1)
model_dir, data, harmful, harmless, scores, out = sys.argv[1:7]
options = {
    "procon": {"procon_harmful": harmful, "procon_harmless": harmless, "procon_alpha": 1.0, "procon_warmup_steps": 1,
               "procon_warmup_alpha": 3.0},
    "mllr": {"mllr_scores": scores, "mllr_lambda": 0.1},
}
for method, extra in options.items():
    cfg = METHODS.get(method).config_cls(
        output_dir=str(Path(out) / f"run-{method}"), model=model_dir, data=[data], method=method, max_steps=3,
        per_device_train_batch_size=2, learning_rate=1e-2, save_steps=100, disable_tqdm=True, plot=False, **extra)
    result = train(cfg)
    model = result.trainer.accelerator.unwrap_model(result.trainer.model)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(Path(out) / f"{method}-rank{cfg.process_index}.safetensors"),
              metadata={"world_size": str(cfg.world_size)})

# Tear the gloo group down before exit: leaving it to interpreter shutdown can abort a rank
# ("terminate called without an active exception") while the other still holds its sockets.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
