"""Reproduce the ProCon drift observation on the reference models (issue 6).

Claim (procon.md §6): benign IFT rotates the refusal direction, sharpest early in training.
Test on `refs/`: is the drift aligned -> aligned-ift larger than the spread between two IFT runs
that differ only in their random seed (LoRA init and data order)?

1. Train a second IFT run of `refs/aligned` on `refs/data/ift.jsonl`, identical to the reference
   build's `aligned-ift` except `--seed`, saving a LoRA checkpoint every `--save-steps` steps.
2. `drift` of aligned -> every checkpoint of that run (the early-training curve) and -> aligned-ift.
3. `drift` of aligned-ift -> the second-seed final model (seed-to-seed spread).
Directions are re-extracted per model on the same contrast prompts (harmful_train/harmless_train
of refusal_direction_splits, `--n` per class, last prompt token), as the spec's drift measure says.
Writes OUT/summary.json and OUT/summary.md; resumable (finished steps are skipped).
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_drift.py [--refs refs] [--out out/drift-repro]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from transformers import set_seed

from latentguard.artifacts import write_json
from latentguard.cli.drift import DriftRunConfig, run_drift
from latentguard.training import TrainConfig, train
from latentguard.training.reference import ReferenceConfig


def _train_seed(refs: Path, run: Path, seed: int, save_steps: int) -> None:
    ref = ReferenceConfig()
    if (run / "adapter" / "adapter_config.json").is_file():
        return
    resume = run.is_dir() and any(run.glob("checkpoint-*"))
    set_seed(seed)  # the LoRA init happens before the trainer seeds itself
    train(TrainConfig(
        output_dir=str(run), model=str(refs / "aligned"), data=[str(refs / "data" / "ift.jsonl")], lora=ref.variant_lora,
        learning_rate=ref.variant_lr, num_train_epochs=ref.ift_epochs, per_device_train_batch_size=ref.batch_size,
        seed=seed, save_steps=save_steps, save_total_limit=None, resume=resume, overwrite=not resume, max_length=384, warmup_steps=2,
    ))


def _drift(base: str, tuned: list[str], out: Path, n: int) -> dict:
    if not (out / "drift.json").is_file():
        run_drift(DriftRunConfig(base=base, tuned=tuned, out=str(out), n=n, overwrite=True))
    return json.loads((out / "drift.json").read_text())


def _cos(row: dict) -> list[float]:
    """Per-layer cosines; layers where a direction is zero (e.g. the embedding output at the fixed
    last template token) have none and are left out of the means."""
    return [float(r["cos"]) for r in row["layers"] if r["cos"] is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refs", default="refs")
    ap.add_argument("--out", default="out/drift-repro")
    ap.add_argument("--seed", type=int, default=43, help="seed of the second IFT run (the reference build uses 42)")
    ap.add_argument("--save-steps", type=int, default=4)
    ap.add_argument("--n", type=int, default=64, help="prompts per class for each direction")
    args = ap.parse_args()
    refs, out = Path(args.refs), Path(args.out)
    run = refs / "runs" / f"aligned-ift-seed{args.seed}-every{args.save_steps}"
    _train_seed(refs, run, args.seed, args.save_steps)
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    curve = _drift(str(refs / "aligned"), [*map(str, ckpts), str(refs / "aligned-ift")], out / "curve", args.n)
    seed = _drift(str(refs / "aligned-ift"), [str(ckpts[-1])], out / "seed", args.n)

    layer = int(curve["direction"]["layer"])
    at = {id(row): row["layers"][layer]["cos"] for row in curve["tuned"] + seed["tuned"]}
    rows = []
    for spec, row in zip([*[f"seed{args.seed} step {c.name.split('-')[1]}" for c in ckpts], "aligned-ift (seed 42)"], curve["tuned"]):
        cos = _cos(row)
        rows.append({"model": spec, "cos_summary_layer": at[id(row)], "cos_mean": statistics.fmean(cos), "cos_min": min(cos),
                     "shift_harmful": row["layers"][layer]["shift_harmful"],
                     "proxy_harmful": row["proxy"]["harmful"]})
    s_cos = _cos(seed["tuned"][0])
    ift_final = rows[-1]
    seed_row = {"model": f"aligned-ift (seed 42) vs seed {args.seed} final", "cos_summary_layer": at[id(seed["tuned"][0])],
                "cos_mean": statistics.fmean(s_cos), "cos_min": min(s_cos)}
    verdict = (1 - ift_final["cos_summary_layer"]) > (1 - seed_row["cos_summary_layer"])
    summary = {"summary_layer": layer, "n_per_class": args.n, "curve": rows, "seed_spread": seed_row,
               "ift_drift_exceeds_seed_spread": verdict, "base_proxy": curve["base_proxy"]}
    write_json(out / "summary.json", summary)
    lines = [f"| run (vs `aligned`, layer {layer}) | cos at layer {layer} | mean cos over layers | min cos | harmful shift on r_aligned | harmful proxy |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['cos_summary_layer']:.3f} | {r['cos_mean']:.3f} | {r['cos_min']:.3f} | "
              f"{r['shift_harmful']:+.2f} | {r['proxy_harmful']:+.2f} |" for r in rows]
    lines.append(f"| seed spread: {seed_row['model']} | {seed_row['cos_summary_layer']:.3f} | {seed_row['cos_mean']:.3f} | "
                 f"{seed_row['cos_min']:.3f} | | |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"ift_drift_exceeds_seed_spread={verdict}")


if __name__ == "__main__":
    main()
