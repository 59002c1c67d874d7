"""Cost of steering: generate tok/s with `add` / `ablate` hooks and with the baked exports, vs plain.

Interleaved in one run on the embedded model at batch 8, with a plain-vs-plain control. Both wall
time and process CPU time are recorded: on the shared 2-core machine other jobs inflate wall time
unevenly (the control shows it), while CPU time of a 1-thread process is much less affected. Every
call generates exactly --new-tokens tokens per row (min = max), so the ratios compare speed, not
response lengths. The direction is a diff-in-means at --layer from 16 + 16 train prompts.
Prints the ratios (goals: steered/plain >= 0.97, exported/plain = 1.00) and writes
benchmarks/results/bench_steer.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_steer.py [--rounds 10] [--batch 8]
     [--device cuda] [--model-config llama3-8b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

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

from latentguard.artifacts import Artifact
from latentguard.defenses import apply_defenses, build_defense
from latentguard.defenses.bake import export_model
from latentguard.eval.datasets import read_prompts, shared_data_dir
from latentguard.hooks import collect
from latentguard.models import format_prompts


def _direction(loaded, layer: int, out: Path) -> str:
    splits = shared_data_dir() / "refusal_direction_splits"
    tok = loaded.tokenizer
    acts = [collect(loaded.model, tok, format_prompts(tok, read_prompts(splits / f"{name}.json")[:16]),
                    [f"resid_pre.{layer}"], progress=False)[f"resid_pre.{layer}"] for name in ("harmful_train", "harmless_train")]
    r = acts[0].double().mean(0) - acts[1].double().mean(0)
    Artifact("refusal_direction", {"direction": r.float()}, {"layer": layer, "defense": "add"}).save(out, model=loaded.info)
    return str(out)


def _cpu_timed(fns: dict[str, Callable[[], None]], cpu: dict[str, list[float]]) -> dict[str, Callable[[], None]]:
    """Wrap each fn to also record its process CPU time (warm-up calls included; dropped later)."""

    def wrap(k: str, fn: Callable[[], None]) -> Callable[[], None]:
        def g() -> None:
            t0 = time.process_time()
            fn()
            cpu[k].append(time.process_time() - t0)

        return g

    return {k: wrap(k, fn) for k, fn in fns.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layer", type=int, default=None, help="default: 18 of 30 on the embedded model, 0.6 x layers otherwise")
    args = ap.parse_args()

    loaded = bench_model(args)
    if args.layer is None:
        args.layer = int(0.6 * loaded.info.n_layers)
    tmp = Path(tempfile.mkdtemp(prefix="bench_steer-"))
    art = _direction(loaded, args.layer, tmp / "direction")
    add, ablate = build_defense(f"add:{art}", loaded), build_defense(f"ablate:{art}", loaded)
    exported = {}
    # export_model checks the baked logits against the hooked model's in float64 within 1e-4; a
    # half-precision or 8B random-init speed run cannot meet that (nor afford float64), so it only bakes
    exact = loaded.model.dtype == torch.float32 and not args.model_config
    check = {} if exact else {"verify_dtype": None, "tolerance": 1e9, "prompts": ["Hi"]}
    for d in (ablate, add):  # each export bakes into a fresh copy of the model
        fresh = bench_model(args)
        export_model(fresh, [d], tmp / f"export-{d.key}", **check)
        del fresh
        exported[d.key] = AutoModelForCausalLM.from_pretrained(tmp / f"export-{d.key}", dtype=loaded.model.dtype).to(args.device).eval()
    tok = loaded.tokenizer
    prompts = format_prompts(tok, read_prompts(shared_data_dir() / "refusal_direction_splits" / "harmless_val.json")[: args.batch])
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def run(model, defenses=()):
        def fn() -> None:
            with torch.no_grad(), apply_defenses(model, list(defenses)):
                out = model.generate(**enc, **gen)
            assert out.shape[1] == enc["input_ids"].shape[1] + args.new_tokens

        return fn

    fns = {"plain": run(loaded.model), "steered_add": run(loaded.model, [add]), "steered_ablate": run(loaded.model, [ablate]),
           "exported_ablate": run(exported["ablate"]), "exported_add": run(exported["add"]), "plain_control": run(loaded.model)}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    times = interleaved(_cpu_timed(fns, cpu), args.rounds)
    cpu = {k: v[1:] for k, v in cpu.items()}  # drop the warm-up call
    n_tokens = args.batch * args.new_tokens
    result = {  # tok/s ratios = inverse time ratios
        **{f"{k}_over_plain": ratio(times, "plain", k) for k in fns if k != "plain"},
        "cpu_time": {f"{k}_over_plain": ratio(cpu, "plain", k) for k in fns if k != "plain"},
        "goal": "steered_*_over_plain >= 0.97; exported_*_over_plain = 1.00 (control shows the noise)",
        "tok_s_median": {k: n_tokens / statistics.median(v) for k, v in times.items()},
        "tok_per_cpu_s_median": {k: n_tokens / statistics.median(v) for k, v in cpu.items()},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "settings": {**model_settings(loaded, args), "export_logit_check": "1e-4 in float64" if exact else "skipped (speed only)",
                     "batch": args.batch, "new_tokens": args.new_tokens,
                     "layer": args.layer, "rounds": args.rounds, "hooks": {"add": 1, "ablate": 3 * loaded.info.n_layers}},
    }
    path = write_result(result_name("bench_steer", args), result)
    for k in fns:
        if k != "plain":
            print(f"{k}_over_plain={result[f'{k}_over_plain']:.3f} (cpu time: {result['cpu_time'][f'{k}_over_plain']:.3f})")
    print(json.dumps(result["tok_s_median"]), f"-> {path}")


if __name__ == "__main__":
    main()
