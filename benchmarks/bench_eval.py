"""Generation throughput through the eval harness vs raw `model.generate`, same batch and settings.

The harness call includes chat formatting, key hashing and one fsync'd JSONL append per record
(a fresh store each call, so nothing is skipped). Interleaved rounds on the embedded model,
with a raw-vs-raw control. Prints `harness_over_raw=<ratio>` (tok/s through the harness over
raw tok/s; goal >= 0.95) and writes benchmarks/results/bench_eval.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval.py [--rounds 5] [--batch 8]
     [--device cuda] [--model-config llama3-8b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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

from latentguard.eval.datasets import DATASETS
from latentguard.eval.generation import GenerationConfig, JsonlStore, generate
from latentguard.models import format_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    loaded = bench_model(args)
    model, tok = loaded.model, loaded.tokenizer
    records = DATASETS.get("xstest-safe").load(args.prompts, seed=0)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    formatted = format_prompts(tok, [r.prompt for r in records])
    outputs: dict[str, list[str]] = {}
    n_new: list[int] = []

    def harness() -> None:
        with tempfile.TemporaryDirectory() as d:
            store = JsonlStore(Path(d) / "generations.jsonl")
            keys = generate(loaded, records, cfg, store, progress=False)
            outputs["harness"] = [store.records[k]["response"] for k in keys]
            n_new[:] = [store.records[k]["n_new_tokens"] for k in keys]

    def raw() -> None:
        texts = []
        for start in range(0, len(formatted), args.batch):
            enc = tok(formatted[start : start + args.batch], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        outputs["raw"] = texts

    def bookkeeping() -> None:
        """The harness minus generation: formatting, keys, skip check, one fsync'd append per record."""
        with tempfile.TemporaryDirectory() as d:
            store = JsonlStore(Path(d) / "generations.jsonl")
            for rec in done.records.values():
                store.append(rec)
            generate(loaded, records, cfg, store, progress=False)

    times = interleaved({"raw": raw, "harness": harness, "raw_control": raw}, args.rounds)
    with tempfile.TemporaryDirectory() as d:
        done = JsonlStore(Path(d) / "generations.jsonl")
        generate(loaded, records, cfg, done, progress=False)
        book = interleaved({"bookkeeping": bookkeeping}, args.rounds)["bookkeeping"]
    if outputs["harness"] != outputs["raw"]:
        raise SystemExit("harness and raw generate disagree on greedy outputs; the comparison is void")
    n_tokens = sum(n_new)  # generated tokens up to and including the stop token
    result = {
        "harness_over_raw": ratio(times, "raw", "harness"),  # throughput ratio = time(raw) / time(harness)
        "control_raw_over_raw": ratio(times, "raw", "raw_control"),
        "goal": "harness_over_raw >= 0.95",
        "tok_s": {k: n_tokens / statistics.median(v) for k, v in times.items()},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "bookkeeping_s": statistics.median(book),
        "bookkeeping_share": statistics.median(book) / statistics.median(times["harness"]),
        "settings": {**model_settings(loaded, args), "prompts": len(records), "batch": args.batch,
                     "max_new_tokens": args.max_new_tokens, "greedy": True, "rounds": args.rounds,
                     "new_tokens": n_tokens},
    }
    path = write_result(result_name("bench_eval", args), result)
    print(f"harness_over_raw={result['harness_over_raw']:.3f}")
    print(f"control_raw_over_raw={result['control_raw_over_raw']:.3f}")
    print(f"bookkeeping_share={result['bookkeeping_share']:.4f}")
    print(json.dumps(result["tok_s"]), f"-> {path}")


if __name__ == "__main__":
    main()
