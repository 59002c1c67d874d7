"""SafetyLock costs on the embedded model: create time, apply (fold) time, and generation speed when locked.

One run: (1) `create_lock` with the default settings (60 AdvBench pairs outside advbench-heldout);
(2) the fold into o_proj biases, timed over repeated fold/restore cycles, plus loading the lock;
(3) greedy generation with a fixed number of new tokens, interleaved over >= 10 rounds: plain,
hooked (`lock_hooks`), folded (a copy of the model with the biases baked in) and a second plain
run as the control. Prints the ratios (goals: hooked/plain >= 0.97, folded/plain = 1.00) and
writes benchmarks/results/bench_lock.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lock.py [--rounds 10] [--batch 8] [--tokens 32]
     [--pairs 60] [--device cuda] [--model-config llama3-8b]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    add_model_args,
    bench_model,
    interleaved,
    model_settings,
    ratio,
    result_name,
    write_result,
)

from latentguard.cli.lock import LockCreateConfig, lock_rows
from latentguard.defenses.safetylock import (
    create_lock,
    fold_lock,
    folded_lock,
    lock_hooks,
    safety_pairs,
)
from latentguard.directions.heads import HeadLock
from latentguard.eval.datasets import read_prompts, shared_data_dir
from latentguard.models import LoadedModel, format_prompts


def _create(loaded: LoadedModel, tmp: Path, n_pairs: int | None) -> tuple[HeadLock, dict[str, Any]]:
    cfg = LockCreateConfig() if n_pairs is None else LockCreateConfig(n_pairs=n_pairs)
    pairs = safety_pairs(lock_rows(cfg)[0], cfg.n_pairs, cfg.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    lock = create_lock(loaded, pairs, cfg, progress=False)
    lock.save(tmp / "lock", loaded.info)
    return lock, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "parts_s": lock.meta["timings_s"],
                  "n_pairs": cfg.n_pairs, "k": cfg.k, "note": "model load excluded"}


def _apply(loaded: LoadedModel, tmp: Path, alpha: float, reps: int = 50) -> dict[str, Any]:
    t0 = time.perf_counter()
    lock = HeadLock.load(tmp / "lock", loaded.info)
    load_s = time.perf_counter() - t0
    folds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with folded_lock(loaded.model, lock, alpha):
            folds.append(time.perf_counter() - t0)
    return {"fold_first_s": folds[0], "fold_median_s": statistics.median(folds), "fold_max_s": max(folds),
            "load_lock_s": load_s, "reps": reps, "goal": "fold <= 0.01 s"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=3.0)
    ap.add_argument("--pairs", type=int, default=None, help="pairs for `create` (default: the lock's default, 60)")
    args = ap.parse_args()

    loaded = bench_model(args)
    model, tok = loaded.model, loaded.tokenizer
    with tempfile.TemporaryDirectory() as d:
        lock, create = _create(loaded, Path(d), args.pairs)
        apply = _apply(loaded, Path(d), args.alpha)
    folded = copy.deepcopy(model)
    fold_lock(folded, lock, args.alpha)
    prompts = read_prompts(shared_data_dir() / "refusal_direction_splits" / "harmless_val.json")[: args.batch]
    enc = tok(format_prompts(tok, prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    gen = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def run(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m.generate(**enc, **gen)

    def hooked() -> None:
        with lock_hooks(model, lock, args.alpha):
            run(model)

    times = interleaved({"plain": lambda: run(model), "hooked": hooked, "folded": lambda: run(folded),
                         "plain_control": lambda: run(model)}, args.rounds)
    n_tokens = args.batch * args.tokens
    result = {
        "create": create, "apply": apply,
        "tok_per_s_ratio": {"hooked_over_plain": 1 / ratio(times, "hooked", "plain"),
                            "folded_over_plain": 1 / ratio(times, "folded", "plain"),
                            "control_plain_over_plain": 1 / ratio(times, "plain_control", "plain")},
        "goal": "hooked/plain >= 0.97, folded/plain = 1.00 (within the control's spread)",
        "tok_per_s_median": {k: n_tokens / statistics.median(v) for k, v in times.items()},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "settings": {**model_settings(loaded, args), "batch": args.batch, "new_tokens": args.tokens, "alpha": args.alpha,
                     "heads": lock.n_heads, "layers": lock.meta["layers"], "rounds": args.rounds},
    }
    path = write_result(result_name("bench_lock", args), result)
    print(f"create: {create['wall_s']:.1f} s wall, {create['cpu_s']:.1f} s CPU; fold median {apply['fold_median_s'] * 1e3:.2f} ms")
    print(json.dumps(result["tok_per_s_ratio"]), f"-> {path}")


if __name__ == "__main__":
    main()
