"""RADIAL attack-prompt construction time on the embedded model, and its share of a full eval run.

Construction = reading and filtering the default benign pool (shared harmless Alpaca minus every
eval set), scoring --pool instructions by inherent response tendency (40 teacher-forced
continuations each, shared prompt cache) and assembling one attack prompt per harmful request.
The full eval run is `latentguard eval --attack radial:RANKING --datasets advbench-heldout,xstest-safe
--limit T` (generation, judging, report) on the same machine right after; the share is
construction / (construction + eval). Also times the shared-cache scorer against the full-forward
path on a few instructions (and checks they agree within 1e-4).
Writes benchmarks/results/bench_attack.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_attack.py [--pool 500] [--targets 32] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result

from latentguard.attacks.pool import DEFAULT_FILTER, load_pool
from latentguard.attacks.radial import (
    RadialConfig,
    build_prompts,
    load_responses,
    rank_instructions,
)
from latentguard.attacks.tendency import score_tendency
from latentguard.eval.datasets import DATASETS, shared_data_dir
from latentguard.eval.runner import EvalConfig, run_eval
from latentguard.models import format_prompts, load_model

QUICK_ARGS = ["--pool", "40", "--targets", "8", "--max-new-tokens", "32", "--shared-check", "2"]


class _Clock:
    def __enter__(self) -> Self:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _shared_vs_full(loaded, instructions: list[str], batch: int) -> dict[str, float]:
    aff, rej = load_responses()
    prompts = format_prompts(loaded.tokenizer, instructions)
    with _Clock() as shared:
        a = score_tendency(loaded, prompts, aff + rej, batch_size=batch, progress=False)
    with _Clock() as full:
        b = score_tendency(loaded, prompts, aff + rej, batch_size=batch, shared_cache=False, progress=False)
    return {"n": len(instructions), "shared_s_per_instruction": shared.wall / len(instructions),
            "full_s_per_instruction": full.wall / len(instructions), "speedup_wall": full.wall / shared.wall,
            "speedup_cpu": full.cpu / shared.cpu, "max_abs_diff_logp": float((a.logp - b.logp).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pool", type=int, default=500, help="instructions scored")
    ap.add_argument("--batch", type=int, default=8, help="instructions per scoring forward")
    ap.add_argument("--targets", type=int, default=32, help="harmful requests (and benign prompts) of the eval run")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--shared-check", type=int, default=8, help="instructions timed on both scoring paths (0 = skip)")
    args = ap.parse_args()

    loaded = load_model(args.model, device=args.device)
    cfg = RadialConfig(pool_size=args.pool, batch_size=args.batch)
    targets = [r.prompt for r in DATASETS.get("advbench-heldout").load(args.targets, 0)]
    with tempfile.TemporaryDirectory() as tmp:
        with _Clock() as t_pool:
            pool = load_pool(None, cfg.pool_size, cfg.seed, DEFAULT_FILTER, shared_data_dir(), None)
        with _Clock() as t_rank:
            ranking = rank_instructions(loaded, pool, cfg, system=None)
        with _Clock() as t_build:
            prompts = build_prompts(ranking, cfg, targets)
        ranking.save(Path(tmp) / "radial" / "ranking", loaded)
        check = _shared_vs_full(loaded, pool.instructions[: args.shared_check], args.batch) if args.shared_check else None
        eval_cfg = EvalConfig(model=args.model, device=args.device, attack=f"radial:{Path(tmp) / 'radial'}",
                              datasets="advbench-heldout,xstest-safe", limit=args.targets,
                              max_new_tokens=args.max_new_tokens, batch_size=8, out=str(Path(tmp) / "eval"))
        with _Clock() as t_eval:
            run_eval(eval_cfg)
        summary = json.loads((Path(tmp) / "eval" / "summary.json").read_text())
    construction = t_pool.wall + t_rank.wall + t_build.wall
    result = {
        "radial_construction_s": round(construction, 2),
        "radial_construction_cpu_s": round(t_pool.cpu + t_rank.cpu + t_build.cpu, 2),
        "parts_s": {"pool_read_filter_sample": round(t_pool.wall, 2), "tendency_scoring": round(t_rank.wall, 2),
                    "assembly": round(t_build.wall, 4)},
        "s_per_instruction": round(t_rank.wall / len(pool.instructions), 3),
        "eval_run_s": round(t_eval.wall, 2),
        "eval_run_cpu_s": round(t_eval.cpu, 2),
        "radial_share_of_eval": round(construction / (construction + t_eval.wall), 4),
        "shared_cache_vs_full_forward": check,
        "eval_harmful_rate_keyword": summary["matrix"]["harmful_rate"],
        "goal": "info: construction time and its share of one eval run (no threshold in issue 10)",
        "settings": {"model": loaded.info.model_id, "device": args.device, "pool": len(pool.instructions),
                     "pool_dropped_by_filter": pool.n_dropped, "batch": args.batch, "responses": 40,
                     "targets": len(prompts), "eval_datasets": "advbench-heldout,xstest-safe", "eval_limit": args.targets,
                     "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads()},
    }
    path = write_result("bench_attack", result)
    print(f"radial_construction_s={construction:.1f} (pool {len(pool.instructions)}, "
          f"{result['s_per_instruction']:.2f} s/instruction)")
    print(f"eval_run_s={t_eval.wall:.1f} radial_share_of_eval={result['radial_share_of_eval']:.3f}")
    if check:
        print(f"shared cache speed-up {check['speedup_wall']:.2f}x (max |d log p| {check['max_abs_diff_logp']:.1e})")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
