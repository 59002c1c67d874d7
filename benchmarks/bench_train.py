"""Cost of latentguard's training wrapper: `latentguard train --method sft` vs a bare trl SFTTrainer.

Same model (embedded), data (the first batch*steps GSM8K train rows, one epoch), LoRA r=8 on
q,k,v,o, batch, max length and optimizer; interleaved rounds with a bare-vs-bare control. The
time is trl's own `train_runtime` (wall time of the training loop, not model loading or
tokenisation); on a shared CPU the process CPU time of each whole run (load + tokenise + train,
identical work on both sides) is recorded too, since it is far less sensitive to other load.
Prints `latentguard_over_bare_steps_per_s=<ratio>` (goal >= 0.95) and writes
benchmarks/results/bench_train.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train.py [--rounds 5] [--steps 4] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved, write_result

from latentguard.eval.datasets import shared_data_dir
from latentguard.models import load_model
from latentguard.training import TrainConfig, train

SETTINGS = {"learning_rate": 2e-4, "save_strategy": "no", "report_to": "none", "use_cpu": True, "bf16": False,
            "activation_checkpointing": False, "disable_tqdm": True, "logging_steps": 1, "optim": "adamw_torch",
            "seed": 42}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_train-"))
    rows = [json.loads(x) for x in (shared_data_dir() / "gsm8k/train.jsonl").read_text().splitlines()[: args.steps * args.batch]]
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n" for r in rows))
    common = {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "max_length": args.max_len, **SETTINGS}
    runtimes: dict[str, float] = {}

    def latentguard() -> None:
        res = train(TrainConfig(output_dir=str(work / "lg"), overwrite=True, model="embedded", data=[str(data)],
                                lora="r=8,alpha=16,targets=q,k,v,o", plot=False, **common))
        runtimes["latentguard"] = res.metrics["train_runtime"]

    def bare(key: str) -> None:
        loaded = load_model("embedded")
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                 "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
        trainer = SFTTrainer(model=loaded.model.train(), args=SFTConfig(output_dir=str(work / key), **common),
                             train_dataset=ds, processing_class=loaded.tokenizer,
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                    task_type="CAUSAL_LM"))
        runtimes[key] = trainer.train().metrics["train_runtime"]

    record: dict[str, list[float]] = {"latentguard": [], "bare": [], "bare_control": []}
    cpu: dict[str, list[float]] = {k: [] for k in record}
    fns = {"latentguard": latentguard, "bare": lambda: bare("bare"), "bare_control": lambda: bare("bare_control")}

    def timed(name: str):
        def run() -> None:
            t0 = time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - t0)
            record[name].append(runtimes[name])
        return run

    interleaved({k: timed(k) for k in fns}, args.rounds, warmup=0)
    med = {k: statistics.median(v) for k, v in record.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "latentguard_over_bare_steps_per_s": med["bare"] / med["latentguard"],
        "control_bare_over_bare": med["bare"] / med["bare_control"],
        "goal": "latentguard_over_bare_steps_per_s >= 0.95",
        "cpu_latentguard_over_bare_runs_per_s": cpu_med["bare"] / cpu_med["latentguard"],
        "cpu_control_bare_over_bare": cpu_med["bare"] / cpu_med["bare_control"],
        "median_train_runtime_s": med, "median_run_cpu_s": cpu_med, "run_cpu_s": cpu, "train_runtime_s": record,
        "steps_per_s": {k: args.steps / v for k, v in med.items()},
        "settings": {"model": "embedded", "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
                     "lora": "r=8,alpha=16,q,k,v,o", "rounds": args.rounds, "data": "gsm8k train rows 0.."
                     f"{len(rows) - 1}"},
    }
    path = write_result("bench_train", result)
    print(f"latentguard_over_bare_steps_per_s={result['latentguard_over_bare_steps_per_s']:.3f}")
    print(f"control_bare_over_bare={result['control_bare_over_bare']:.3f}")
    print(f"cpu_latentguard_over_bare={result['cpu_latentguard_over_bare_runs_per_s']:.3f} "
          f"(control {result['cpu_control_bare_over_bare']:.3f})")
    print(json.dumps(med), f"-> {path}")


if __name__ == "__main__":
    main()
