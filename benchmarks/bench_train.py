"""Cost of latentguard's training wrapper and of its methods, interleaved in one run.

1. `latentguard train --method sft` (the library call) vs a bare trl SFTTrainer, with a
   bare-vs-bare control (goal: latentguard_over_bare_steps_per_s >= 0.95).
2. `--method procon` (all 30 layers, α = 0.1) and `--method mllr` (λ = 0.1, module scores
   computed once before the rounds) vs `--method sft`: time per optimizer step
   (goals: procon_step_over_sft_step <= 1.10, mllr_step_over_sft_step <= 1.02), and the peak
   memory of each run (ratio to sft).
Same model (embedded, or --model / --model-config), data (the first batch*steps GSM8K train rows, one epoch), LoRA r=8 on
q,k,v,o, batch, max length and optimizer. A step's time is trl's `train_runtime` (wall time of the
training loop: no model loading, tokenisation, or the one-off ProCon/ML-LR preparation) over the
steps; on a shared CPU the process CPU time of the same loop is recorded too (`cpu_*`), since it
is far less sensitive to other load. Peak memory: peak RSS of the process during each run
(Linux: VmHWM, reset before every run via /proc/self/clear_refs), or CUDA max allocated; also its
growth over the memory in use when the run started (`peak_growth_*`, the run's own footprint).
Writes benchmarks/results/bench_train.json (`_gpu` off the CPU, `_<shape>` with --model-config).
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train.py [--rounds 5] [--steps 4] [--batch 4]
GPU: .venv/bin/python benchmarks/bench_train.py --device cuda --model-config llama3-8b --rounds 2
(a random-init model of that shape, saved once to a temporary folder and loaded by every run like a
real checkpoint; on a GPU the base loads in bf16 (--model-dtype bfloat16) and trains with bf16 autocast).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_model_args, bench_model, interleaved, result_name, write_result

from latentguard.directions.modules import ModuleScoreConfig, module_data_from_splits, score_modules
from latentguard.eval.datasets import shared_data_dir
from latentguard.models import load_model
from latentguard.training import METHODS, train
from latentguard.training import trainer as _trainer

SETTINGS = {"learning_rate": 2e-4, "save_strategy": "no", "report_to": "none", "activation_checkpointing": False, "disable_tqdm": True, "logging_steps": 1, "optim": "adamw_torch",
            "seed": 42}
GOAL = "latentguard_over_bare_steps_per_s >= 0.95; procon_step_over_sft_step <= 1.10; mllr_step_over_sft_step <= 1.02"

_LOOP_CPU: list[float] = []
_train_loop = _trainer.LatentGuardTrainer.train


def _timed_train(self: Any, *args: Any, **kwargs: Any) -> Any:
    """LatentGuardTrainer.train with the loop's process CPU time recorded (benchmark instrumentation only)."""
    t0 = time.process_time()
    try:
        return _train_loop(self, *args, **kwargs)
    finally:
        _LOOP_CPU.append(time.process_time() - t0)


_trainer.LatentGuardTrainer.train = _timed_train  # type: ignore[method-assign]


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> float | None:
    """Reset the peak counter; returns the memory in use now (the run's starting point)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    return _status_mb("VmRSS")


def _peak_mb() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


def _model_spec(args: argparse.Namespace, work: Path) -> str:
    """--model, or the --model-config random-init model saved once (every run then loads it like a checkpoint)."""
    if not args.model_config:
        return str(args.model)
    loaded = bench_model(args)
    loaded.model.save_pretrained(work / "model")
    loaded.tokenizer.save_pretrained(work / "model")
    del loaded
    gc.collect()
    return str(work / "model")


def _mllr_scores(work: Path, spec: str, dtype: str) -> Path:
    """Module scores of the model, once (small settings: this benchmark times steps, not scoring)."""
    loaded = load_model(spec, dtype=dtype)
    data = module_data_from_splits(shared_data_dir() / "refusal_direction_splits", n_fit=16, n_val=4)
    t0 = time.perf_counter()
    art = score_modules(loaded, data, ModuleScoreConfig(seeds=1, max_evals=4, min_probe_acc=0.0))
    art.meta["scoring_wall_s"] = time.perf_counter() - t0
    art.save(work / "mllr_scores", model=loaded.info)
    return work / "mllr_scores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    add_model_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_train-"))
    spec = _model_spec(args, work)
    on_cpu = str(args.device) == "cpu"
    rows = [json.loads(x) for x in (shared_data_dir() / "gsm8k/train.jsonl").read_text().splitlines()[: args.steps * args.batch]]
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n" for r in rows))
    common = {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "max_length": args.max_len, **SETTINGS,
              "use_cpu": on_cpu, "bf16": not on_cpu}
    dtype = "float32" if on_cpu else "bfloat16"  # a GPU loads the base in bf16 (half the weights' memory and load time)
    lg = {"overwrite": True, "model": spec, "model_dtype": dtype, "data": [str(data)], "lora": "r=8,alpha=16,targets=q,k,v,o",
          "plot": False, "data_dir": str(shared_data_dir()), **common}
    scores = _mllr_scores(work, spec, dtype)
    runtimes: dict[str, float] = {}
    loop_cpu: dict[str, float] = {}

    def method_run(key: str, method: str, **extra: Any) -> Callable[[], None]:
        def run() -> None:
            cls = METHODS.get(method).config_cls
            res = train(cls(output_dir=str(work / key), method=method, **lg, **extra))
            runtimes[key], loop_cpu[key] = res.metrics["train_runtime"], _LOOP_CPU[-1]
        return run

    def bare(key: str) -> None:
        loaded = load_model(spec, dtype=dtype)
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                 "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
        trainer = SFTTrainer(model=loaded.model.train(), args=SFTConfig(output_dir=str(work / key), **common),
                             train_dataset=ds, processing_class=loaded.tokenizer,
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                    task_type="CAUSAL_LM"))
        t0 = time.process_time()
        runtimes[key] = trainer.train().metrics["train_runtime"]
        loop_cpu[key] = time.process_time() - t0

    fns: dict[str, Callable[[], None]] = {
        "latentguard": method_run("latentguard", "sft"), "bare": lambda: bare("bare"),
        "bare_control": lambda: bare("bare_control"),
        "procon": method_run("procon", "procon", procon_alpha=0.1, procon_n_directions=16),
        "mllr": method_run("mllr", "mllr", mllr_scores=str(scores), mllr_lambda=0.1),
    }
    record: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    loop: dict[str, list[float]] = {k: [] for k in fns}
    peak: dict[str, list[float]] = {k: [] for k in fns}
    growth: dict[str, list[float]] = {k: [] for k in fns}

    def timed(name: str) -> Callable[[], None]:
        def run() -> None:
            start = _reset_peak()
            t0 = time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - t0)
            record[name].append(runtimes[name])
            loop[name].append(loop_cpu[name])
            mb = _peak_mb()
            if mb is not None and start is not None:
                peak[name].append(mb)
                growth[name].append(mb - start)
        return run

    interleaved({k: timed(k) for k in fns}, args.rounds, warmup=0)
    result = _result(args, record, cpu, loop, (peak, growth), scores, len(rows))
    result["settings"] |= {"model": f"random-{args.model_config}" if args.model_config else spec,
                           "model_config": args.model_config, "device": str(args.device),
                           "precision": "float32" if on_cpu else "bf16 base weights, float32 LoRA, bf16 autocast"}
    path = write_result(result_name("bench_train", args), result)
    for k in ("latentguard_over_bare_steps_per_s", "control_bare_over_bare", "procon_step_over_sft_step",
              "cpu_procon_step_over_sft_step", "mllr_step_over_sft_step", "cpu_mllr_step_over_sft_step"):
        print(f"{k}={result[k]:.3f}")
    print(f"peak_memory_ratio={json.dumps(result['peak_memory_ratio'])} "
          f"peak_growth_ratio={json.dumps(result['peak_growth_ratio'])} -> {path}")


def _result(args: argparse.Namespace, record: dict[str, list[float]], cpu: dict[str, list[float]],
            loop: dict[str, list[float]], memory: tuple[dict[str, list[float]], dict[str, list[float]]], scores: Path,
            n_rows: int) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in record.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    loop_med = {k: statistics.median(v) for k, v in loop.items()}
    peak, growth = memory
    peak_med = {k: statistics.median(v) for k, v in peak.items() if v}
    growth_med = {k: statistics.median(v) for k, v in growth.items() if v}
    sft = "latentguard"
    mem = {f"{m}_vs_sft": peak_med[m] / peak_med[sft] for m in ("procon", "mllr") if m in peak_med and sft in peak_med}
    grow = {f"{m}_vs_sft": growth_med[m] / growth_med[sft] for m in ("procon", "mllr")
            if m in growth_med and growth_med.get(sft, 0) > 0}
    scoring = json.loads((scores / "meta.json").read_text()).get("scoring_wall_s")
    return {
        "latentguard_over_bare_steps_per_s": med["bare"] / med["latentguard"],
        "control_bare_over_bare": med["bare"] / med["bare_control"],
        "procon_step_over_sft_step": med["procon"] / med[sft],
        "mllr_step_over_sft_step": med["mllr"] / med[sft],
        "goal": GOAL,
        "cpu_latentguard_over_bare_runs_per_s": cpu_med["bare"] / cpu_med["latentguard"],
        "cpu_control_bare_over_bare": cpu_med["bare"] / cpu_med["bare_control"],
        "cpu_procon_step_over_sft_step": loop_med["procon"] / loop_med[sft],
        "cpu_mllr_step_over_sft_step": loop_med["mllr"] / loop_med[sft],
        "peak_memory_ratio": mem,
        "peak_growth_ratio": grow,
        "peak_memory_mb": peak_med,
        "peak_growth_mb": growth_med,
        "peak_memory_kind": "cuda max allocated" if torch.cuda.is_available() else "process peak RSS (VmHWM) per run",
        "median_train_runtime_s": med, "median_run_cpu_s": cpu_med, "median_loop_cpu_s": loop_med,
        "train_runtime_s": record, "run_cpu_s": cpu, "loop_cpu_s": loop, "peak_memory_mb_per_round": peak,
        "peak_growth_mb_per_round": growth,
        "mllr_scoring_wall_s_once": scoring,
        "settings": {"model": "embedded", "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
                     "lora": "r=8,alpha=16,q,k,v,o", "rounds": args.rounds, "data": f"gsm8k train rows 0..{n_rows - 1}",
                     "procon": "all layers, alpha 0.1, abs, 16+16 direction prompts (prepare not timed)",
                     "mllr": "lambda 0.1, split; scores once: 16+16 fit, 4+4 held out, 1 seed, 4 search evals"},
    }


if __name__ == "__main__":
    main()
