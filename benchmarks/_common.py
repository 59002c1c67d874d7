"""Shared helpers for benchmark scripts: interleaved timing and a JSON result record."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# benchmarks/run_all.py points this elsewhere for --quick runs, so they never overwrite full results.
RESULTS = Path(os.environ.get("LATENTGUARD_BENCH_RESULTS") or Path(__file__).parent / "results")

# Random-init shapes for speed runs where the real weights are not at hand (`--model-config`).
# Speed depends on shapes, not weights; the tokenizer is the embedded model's (its ids are < vocab).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                  "tie_word_embeddings": False},
    # a few-MB model that exercises the same code path on a CPU in seconds
    "llama-tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 49152,
                   "max_position_embeddings": 2048, "tie_word_embeddings": True},
}


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each fn once per round, rotating the order every round so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            _sync()
            t0 = time.perf_counter()
            fns[k]()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return times


def _sync() -> None:
    """Wait for queued GPU work, so a timed call includes its kernels (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(times[num]) / statistics.median(times[den])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_avg": os.getloadavg(),
    }


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        **payload,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model / --model-config / --device / --dtype, shared by the benchmark scripts."""
    ap.add_argument("--model", default="embedded", help="model spec for load_model (ignored with --model-config)")
    ap.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                    help="a randomly initialised Llama of this shape instead of --model (speed runs only)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16, ...; default float32 on CPU, bfloat16 on CUDA")


def bench_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.float32 if str(args.device) == "cpu" else torch.bfloat16


def bench_tokenizer() -> Any:
    """The embedded model's tokenizer, or the saved copy in $LATENTGUARD_BENCH_TOKENIZER (a GPU machine
    without the embedded model's package: benchmarks/gpu/kit.sh saves one)."""
    path = os.environ.get("LATENTGUARD_BENCH_TOKENIZER")
    if not path:
        from latentguard.models import load_model

        return load_model("embedded").tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # as load_model prepares it
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bench_model(args: argparse.Namespace, seed: int = 0) -> Any:
    """A LoadedModel: `load_model(args.model)`, or a seeded random-init `--model-config` model.

    The random model carries the embedded model's tokenizer and chat template; the same seed
    gives the same weights (hence the same fingerprint) on every call.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    from latentguard.models import LoadedModel, load_model, model_info

    dtype = bench_dtype(args)
    if not getattr(args, "model_config", None):
        return load_model(args.model, dtype=dtype, device=args.device)
    tok = bench_tokenizer()
    cfg = LlamaConfig(**MODEL_CONFIGS[args.model_config], bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    name = f"random-{args.model_config}"
    return LoadedModel(model=model, tokenizer=tok, info=model_info(model, model_id=name))


def result_name(base: str, args: argparse.Namespace) -> str:
    """`bench_x`, `bench_x_gpu` off the CPU, plus `_<model-config>` for random-init shapes."""
    name = base + ("_gpu" if str(getattr(args, "device", "cpu")) != "cpu" else "")
    cfg = getattr(args, "model_config", None)
    return name + (f"_{cfg}" if cfg else "")


def model_settings(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What to record about the model a benchmark ran on."""
    return {"model": loaded.info.model_id, "model_config": getattr(args, "model_config", None),
            "device": str(args.device), "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch.")}
