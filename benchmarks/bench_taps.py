"""Cost of reading hidden states: forward with all-layer last-token capture vs a plain forward.

Interleaved in one run on the embedded model, with a plain-vs-plain control.
Prints `capture_over_plain=<ratio>` (goal <= 1.15) and writes benchmarks/results/bench_taps.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_taps.py [--rounds 10] [--batch 16]
     [--device cuda] [--model-config llama3-8b]   (GPU: writes bench_taps_gpu[_llama3-8b].json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

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

from latentguard.eval.datasets import read_prompts, shared_data_dir
from latentguard.hooks import capture, encode_batch
from latentguard.models import format_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    loaded = bench_model(args)
    model, tok, L = loaded.model, loaded.tokenizer, loaded.info.n_layers
    prompts = read_prompts(shared_data_dir() / "refusal_direction_splits" / "harmless_val.json")[: args.batch]
    kwargs = encode_batch(tok, format_prompts(tok, prompts), model.device).forward_kwargs()
    sites = [f"resid_post.{l}" for l in range(L)]

    def plain() -> None:
        with torch.no_grad():
            model(**kwargs, use_cache=False)

    def captured() -> None:
        with torch.no_grad(), capture(model, sites, reduce=lambda x: x[:, -1]) as rec:
            model(**kwargs, use_cache=False)
        assert len(rec[sites[-1]]) == 1

    times = interleaved({"plain": plain, "capture": captured, "plain_control": plain}, args.rounds)
    result = {
        "capture_over_plain": ratio(times, "capture", "plain"),
        "control_plain_over_plain": ratio(times, "plain_control", "plain"),
        "goal": "capture_over_plain <= 1.15",
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "settings": {**model_settings(loaded, args), "batch": args.batch, "tokens": int(kwargs["input_ids"].numel()),
                     "sites": f"resid_post.0..{L - 1}, last token", "rounds": args.rounds},
    }
    path = write_result(result_name("bench_taps", args), result)
    print(f"capture_over_plain={result['capture_over_plain']:.3f}")
    print(f"control_plain_over_plain={result['control_plain_over_plain']:.3f}")
    print(json.dumps(result["median_s"]), f"-> {path}")


if __name__ == "__main__":
    main()
