"""`latentguard reproduce --jobs N` against `--jobs 1`: wall time of the same recipe, same results.

Runs the recipe (default: the shipped quick recipe, a direction step and four eval rows on the
embedded model) from scratch into fresh temporary folders, once with --jobs 1 and once with
--jobs N per round, alternating which goes first. Prints the wall-time ratio (jobs N ÷ jobs 1,
median over rounds; below 1 is faster), the children's CPU seconds (the work, which should not
grow), and whether both runs wrote the same table. Writes benchmarks/results/bench_reproduce.json.
Measure on an otherwise idle machine: the point of --jobs is the second core.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_reproduce.py [--jobs 2] [--rounds 2]
     [--config configs/reproduce/embedded.yaml] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result

QUICK_ARGS = ["--rounds", "1"]
ROOT = Path(__file__).resolve().parents[1]
_TABLE_KEYS = ("harmful", "overrefusal", "nll", "matrix")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(config: str, quick: bool, jobs: int, out: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "latentguard.cli.main", "reproduce", "--config", config, "--out", str(out),
            "--jobs", str(jobs), *(["--quick"] if quick else [])]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"reproduce --jobs {jobs} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    doc = json.loads((out / "results.json").read_text())
    table = {r["name"]: {k: r.get(k) for k in _TABLE_KEYS} for r in doc["rows"]}
    return {"wall_s": wall, "cpu_s": cpu, "table": table, "stages": doc["last_run"]["stages"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/reproduce/embedded.yaml")
    ap.add_argument("--full", action="store_true", help="the full recipe instead of its quick section (hours)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    runs: dict[int, list[dict[str, Any]]] = {1: [], args.jobs: []}
    with tempfile.TemporaryDirectory(prefix="bench-reproduce-") as tmp:
        for r in range(args.rounds):
            order = [1, args.jobs] if r % 2 == 0 else [args.jobs, 1]
            for jobs in order:
                res = run_once(args.config, not args.full, jobs, Path(tmp) / f"r{r}-j{jobs}")
                runs[jobs].append(res)
                print(f"round {r} --jobs {jobs}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU "
                      f"({len(res['stages'])} stages)", flush=True)
    wall = {j: statistics.median(x["wall_s"] for x in v) for j, v in runs.items()}
    cpu = {j: statistics.median(x["cpu_s"] for x in v) for j, v in runs.items()}
    same = all(x["table"] == runs[1][0]["table"] for v in runs.values() for x in v)
    ratio = wall[args.jobs] / wall[1]
    print(f"reproduce --jobs {args.jobs} ÷ --jobs 1 wall: {ratio:.2f} ({wall[args.jobs]:.1f} s vs {wall[1]:.1f} s); "
          f"CPU {cpu[args.jobs]:.1f} s vs {cpu[1]:.1f} s; same table: {same}")
    payload = {
        "goal": f"--jobs {args.jobs} ÷ --jobs 1 wall < 1 with the same table",
        "settings": {"config": args.config, "quick": not args.full, "jobs": args.jobs, "rounds": args.rounds},
        "wall_s": {str(j): [round(x["wall_s"], 2) for x in v] for j, v in runs.items()},
        "cpu_s": {str(j): [round(x["cpu_s"], 2) for x in v] for j, v in runs.items()},
        "jobs_over_serial_wall": round(ratio, 3),
        "cpu_jobs_over_serial": round(cpu[args.jobs] / cpu[1], 3),
        "same_results": same,
    }
    print(f"wrote {write_result('bench_reproduce', payload)}")
    if not same:
        raise SystemExit("the parallel run wrote a different table than the serial one")


if __name__ == "__main__":
    main()
