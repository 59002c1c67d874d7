"""2-process DDP on CPU with gloo, launched by accelerate with the shipped config: both ranks
end with identical (and changed) LoRA weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_cpu_ddp_ends_with_identical_weights(tmp_path, tiny_dir, pairs_file):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/ddp_cpu.yaml"),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(Path(__file__).with_name("ddp_worker.py")), str(tiny_dir), str(pairs_file), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    with safe_open(str(tmp_path / "rank1.safetensors"), "pt") as f:
        assert f.metadata() == {"world_size": "2", "backend": "gloo"}
    assert ranks[0].keys() == ranks[1].keys() and any("lora_B" in k for k in ranks[0])
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert any(float(v.abs().max()) > 0 for k, v in ranks[0].items() if "lora_B" in k)  # training happened
