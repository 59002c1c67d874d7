"""Cost of MoGU routing: generate tok/s under MoGU vs plain, and router parameter counts.

Interleaved in one run on the embedded model at --batch (default 8), with a plain-vs-plain control:
MoGU routing the first K response tokens (`handoff=recompute`, the default: K routed tokens, then the
base re-prefills prompt + prefix; and `keep_cache`), and routing every token (`k=all`), for the
spec's v1 layout (every layer, v1 gates with the 512 bottleneck) and a v2 layout (the top
max(2, L/4) layers, linear gates). Each call generates exactly --new-tokens tokens per row (min =
max), so ratios compare speed. Wall and process CPU time are both recorded (the shared machine
inflates wall time unevenly). Weights are random unless --mogu DIR is given: speed depends on
shapes only. Writes benchmarks/results/bench_mogu.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mogu.py [--rounds 6] [--batch 8] [--mogu DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved, ratio, write_result

from latentguard.defenses import apply_defenses, build_defense
from latentguard.defenses.mogu import MoGUModules
from latentguard.eval.datasets import read_prompts, shared_data_dir
from latentguard.models import format_prompts, load_model


def _artefact(loaded, layers: list[int], gate: str, out: Path) -> str:
    """A MoGU artefact with random experts (std 0.02) and fresh routers: the real layout, random weights."""
    torch.manual_seed(0)
    mods = MoGUModules.for_model(loaded.model, layers, rank=8, gate=gate)
    for m in mods.layers.values():
        torch.nn.init.normal_(m.A, std=0.02)
        torch.nn.init.normal_(m.B, std=0.02)
    mods.to_artifact({"method": "bench", "k": 5}).save(out, model=loaded.info)
    return str(out)


def _cpu_timed(fns: dict[str, Callable[[], None]], cpu: dict[str, list[float]]) -> dict[str, Callable[[], None]]:
    def wrap(k: str, fn: Callable[[], None]) -> Callable[[], None]:
        def g() -> None:
            t0 = time.process_time()
            fn()
            cpu[k].append(time.process_time() - t0)

        return g

    return {k: wrap(k, fn) for k, fn in fns.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--mogu", default=None, help="a trained MoGU artefact (default: random weights, v1 + v2 layouts)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()

    loaded = load_model(args.model)
    n_layers = loaded.info.n_layers
    tmp = Path(tempfile.mkdtemp(prefix="bench_mogu-"))
    top = max(2, math.ceil(n_layers / 4))
    v2_layers = list(range(n_layers - top - 4, n_layers - 4))  # speed depends on the count, not on which layers
    arts = {"v1": args.mogu or _artefact(loaded, list(range(n_layers)), "v1", tmp / "v1"),
            "v2": _artefact(loaded, v2_layers, "linear", tmp / "v2")}
    d = {f"{name}_{mode}": build_defense(f"mogu:{art},{spec}", loaded) for name, art in arts.items()
         for mode, spec in (("first_k", f"k={args.k}"), ("first_k_keep_cache", f"k={args.k},handoff=keep_cache"),
                            ("all_tokens", "k=all"))}
    tok = loaded.tokenizer
    prompts = format_prompts(tok, read_prompts(shared_data_dir() / "refusal_direction_splits" / "harmless_val.json")[: args.batch])
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def run(defenses=()):
        def fn() -> None:
            with torch.no_grad(), apply_defenses(loaded.model, list(defenses)):
                out = loaded.model.generate(**enc, **gen)
            assert out.shape[1] == enc["input_ids"].shape[1] + args.new_tokens

        return fn

    fns = {"plain": run(), **{k: run([v]) for k, v in d.items()}, "plain_control": run()}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    times = interleaved(_cpu_timed(fns, cpu), args.rounds)
    cpu = {k: v[1:] for k, v in cpu.items()}  # drop the warm-up call
    n_tokens = args.batch * args.new_tokens
    counts = {name: d[f"{name}_first_k"].modules.counts() for name in arts}
    d_in = d["v1_first_k"].modules.layout["d_in"]
    spec_v1 = MoGUModules(list(range(n_layers)), d_in, d["v1_first_k"].modules.layout["d_out"], 8, "v1").counts()
    result = {  # tok/s ratios = inverse time ratios
        **{f"{k}_over_plain": ratio(times, "plain", k) for k in fns if k != "plain"},
        "cpu_time": {f"{k}_over_plain": ratio(cpu, "plain", k) for k in fns if k != "plain"},
        "router_params": {**{name: c["router"] for name, c in counts.items()}, "spec_v1_layout": spec_v1["router"],
                          "v2_over_spec_v1": counts["v2"]["router"] / spec_v1["router"]},
        "expert_params": {name: c["experts"] for name, c in counts.items()},
        "layouts": {"v1": {"layers": n_layers, "gate": d["v1_first_k"].modules.layout["gate"], "trained": bool(args.mogu)},
                    "v2": {"layers": len(v2_layers), "gate": "linear"}},
        "tok_s_median": {k: n_tokens / statistics.median(v) for k, v in times.items()},
        "tok_per_cpu_s_median": {k: n_tokens / statistics.median(v) for k, v in cpu.items()},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "settings": {"model": loaded.info.model_id, "batch": args.batch, "new_tokens": args.new_tokens, "k": args.k,
                     "rounds": args.rounds},
    }
    path = write_result("bench_mogu", result)
    for k in fns:
        if k != "plain":
            print(f"{k}_over_plain={result[f'{k}_over_plain']:.3f} (cpu time: {result['cpu_time'][f'{k}_over_plain']:.3f})")
    print(json.dumps(result["router_params"]), f"-> {path}")


if __name__ == "__main__":
    main()
