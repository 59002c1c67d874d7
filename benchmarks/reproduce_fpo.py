"""Reproduce issue 11 on the embedded model: DPO vs FPO with the same pairs, steps and seed.

Stages (each skipped when its output exists: rerun the same command to resume):
1. pairs  `latentguard reference pairs`: harmful prompt -> (refusal, the model's own compliance),
          benign prompt -> (the model's own answer, refusal); split into --train-pairs for training
          and the rest, held out, for the feature-drift measure.
2. sae    `latentguard sae train` at resid_post.LAYER (the last block, pre-norm) on the default text
          mix plus the training pairs.
3. runs   full fine-tuning from the embedded model, same lr / steps / batch / seed / max length:
          - dpo     `--method dpo`: trl's DPO (sigmoid loss), reference model run online every step;
          - fpo-a0  `--method fpo --fpo-alpha 0`: length-normalised DPO, reference cached offline;
          - fpo     `--method fpo --fpo-alpha A`: plus the SAE feature constraint.
          Each run is a child process (clean memory figures) that records per optimizer step the
          wall time, the process CPU time and the peak RSS (VmHWM reset at each step; CUDA: peak
          allocated), plus the one-time setup (loading, tokenising, reference passes).
4. eval   `latentguard eval` (keyword judge, greedy) of embedded and each run: advbench-heldout
          (harmful rate), xstest-safe (over-refusal), gsm8k-test (answer NLL), --limit prompts each.
5. sweep  FPO at each `--sweep` alpha (same pairs, steps, seed), scored on VALIDATION prompts only:
          harmful = refusal-direction harmful_val (HarmBench val behaviours) minus every AdvBench goal,
          the HarmBench test split, XSTest and every pair prompt; over-refusal = the project's borderline validation share (never trained on,
          XSTest near-duplicates removed). The alpha with the lowest harmful + over-refusal rate wins
          (ties: the smaller alpha) and only that model is evaluated on the test sets, as `fpo-tuned`.
6. drift  FPO's D (mean over the union of top-k SAE latents of (c̄_model − c̄_embedded)²) on the
          held-out pairs, chosen and rejected responses.
Outputs in --out: pairs.jsonl, sae/, runs/<run>/ (+ cost.json), eval/<model>/, results.json,
results.md; the record also goes to benchmarks/results/reproduce_fpo.json (--quick: not written).

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_fpo.py --out out/fpo
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_fpo.py --out out/fpo-quick --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write_result

from latentguard.artifacts import write_json
from latentguard.directions.sae import load_sae, pooled_pair_codes
from latentguard.directions.sae_train import SAETrainConfig, build_sae
from latentguard.eval.datasets import resolve_dataset, shared_data_dir
from latentguard.eval.runner import EvalConfig, run_eval
from latentguard.models import load_model
from latentguard.training import METHODS
from latentguard.training import reference_data as rd
from latentguard.training.config import PreferenceConfig
from latentguard.training.methods.fpo import FPOConfig, feature_drift
from latentguard.training.pairs import DEFAULT_SAE_DATA, PairsConfig, build_safety_pairs, sae_texts
from latentguard.training.preference import read_preference_pairs
from latentguard.training.run import train_preference

DATASETS = ("advbench-heldout", "xstest-safe", "gsm8k-test")
RUNS = ("dpo", "fpo-a0", "fpo")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/fpo", help="output folder (rerun to resume)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: 2 steps, 4 prompts per eval set")
    ap.add_argument("--n-harmful", type=int, default=60)
    ap.add_argument("--n-benign", type=int, default=20)
    ap.add_argument("--train-pairs", type=int, default=64, help="pairs trained on; the rest are held out for drift")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    ap.add_argument("--lr", type=float, default=5e-6, help="spec §9: 5e-6, raised from the paper's 5e-7 to see a change")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--sweep", default="0.05,0.1,0.2",
                    help="extra FPO alphas scored on the validation prompts ('' = none); --alpha and 0 are always scored")
    ap.add_argument("--val-limit", type=int, default=32, help="validation prompts per side for the alpha sweep")
    ap.add_argument("--k", type=int, default=16, help="fpo_k (spec §9 small-scale check: 16)")
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--layer", type=int, default=29)
    ap.add_argument("--sae-width", type=int, default=2048)
    ap.add_argument("--sae-k", type=int, default=32)
    ap.add_argument("--sae-tokens", type=int, default=24_000)
    ap.add_argument("--limit", type=int, default=32, help="prompts per eval set")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one training run
    args = ap.parse_args(argv)
    if args.quick:
        args.n_harmful, args.n_benign, args.train_pairs, args.steps = 8, 4, 8, 2
        args.sae_width, args.sae_tokens, args.limit, args.max_new_tokens = 256, 3000, 4, 16
        args.sweep, args.val_limit = "0.1", 4
    try:
        args.sweep_alphas = sorted({float(a) for a in args.sweep.split(",") if a.strip()} - {0.0, args.alpha})
    except ValueError:
        ap.error(f"--sweep {args.sweep!r}: a comma list of numbers, e.g. 0.05,0.1,0.2")
    if any(a < 0 for a in args.sweep_alphas) or args.alpha < 0:
        ap.error("FPO alphas must be >= 0.")
    return args


def _log(msg: str) -> None:
    print(f"[reproduce_fpo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- stages 1-2


def _pairs(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    train_path, held_path = out / "pairs-train.jsonl", out / "pairs-heldout.jsonl"
    if not held_path.is_file():
        if not (out / "pairs.jsonl").is_file():
            _log("building pairs")
            build_safety_pairs(PairsConfig(out=str(out / "pairs.jsonl"), n_harmful=args.n_harmful,
                                           n_benign=args.n_benign, seed=args.seed), shared_data_dir(), _log)
        lines = (out / "pairs.jsonl").read_text().splitlines(keepends=True)
        train_path.write_text("".join(lines[: args.train_pairs]))
        held_path.write_text("".join(lines[args.train_pairs:]))
    return train_path, held_path


def _sae(args: argparse.Namespace, out: Path, train_pairs: Path) -> Path:
    dest = out / "sae"
    if not (dest / "meta.json").is_file():
        _log("training the SAE")
        cfg = SAETrainConfig(layer=args.layer, width=args.sae_width, k=args.sae_k, max_tokens=args.sae_tokens,
                             splice_pairs=8 if args.quick else 32, seed=args.seed)
        texts = sae_texts(DEFAULT_SAE_DATA, [str(train_pairs)], args.seed, shared_data_dir())
        build_sae(load_model("embedded"), texts, cfg, dest, log=_log)
    return dest


# ---------------------------------------------------------------- stage 3 (child process)


class StepCost(TrainerCallback):
    """Per optimizer step: wall seconds, process CPU seconds and peak memory (MB) during the step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = _vm("VmHWM")
        self.steps.append({"step": state.global_step, "wall_s": time.perf_counter() - self.t0,
                           "cpu_s": time.process_time() - self.c0, "peak_mb": peak})


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _config(args: argparse.Namespace, out: Path, name: str, pairs: Path, sae: Path) -> PreferenceConfig:
    common: dict[str, Any] = {
        "output_dir": str(out / "runs" / name), "overwrite": True, "model": "embedded", "pairs": str(pairs), "full": True,
        "max_steps": args.steps, "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
        "learning_rate": args.lr, "warmup_steps": 0, "beta": args.beta, "max_length": args.max_len, "seed": args.seed,
        "save_strategy": "no", "disable_tqdm": True, "plot": True,
    }
    if name == "dpo":
        return PreferenceConfig(method="dpo", **common)
    alpha = 0.0 if name == "fpo-a0" else float(name.removeprefix("fpo-a")) if name.startswith("fpo-a") else args.alpha
    return FPOConfig(fpo_sae=str(sae), fpo_alpha=alpha, fpo_k=args.k, **common)


def _child(args: argparse.Namespace) -> None:
    out, name = Path(args.out), args.child
    torch.manual_seed(args.seed)
    cfg = _config(args, out, name, out / "pairs-train.jsonl", out / "sae")
    cost = StepCost()
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_preference(cfg, METHODS.get(cfg.method)(cfg), callbacks=[cost])
    total = time.perf_counter() - t0
    write_json(out / "runs" / name / "cost.json", {
        "steps": cost.steps, "train_runtime_s": res.metrics["train_runtime"], "total_wall_s": total,
        "total_cpu_s": time.process_time() - c0, "setup_wall_s": total - res.metrics["train_runtime"],
        "peak_rss_process_mb": _vm("VmPeak") if not torch.cuda.is_available() else None,
    })


def _train(args: argparse.Namespace, out: Path, name: str) -> dict[str, Any]:
    cost = out / "runs" / name / "cost.json"
    if not cost.is_file():
        _log(f"training {name} ({args.steps} steps)")
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", name]
        subprocess.run(argv, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(cost.read_text())


# ---------------------------------------------------------------- stages 4-5


def _model_path(out: Path, name: str) -> str:
    return "embedded" if name == "embedded" else str(out / "runs" / name / "model")


def _eval(args: argparse.Namespace, out: Path, name: str) -> dict[str, Any]:
    dest = out / "eval" / name
    if not (dest / "summary.json").is_file():
        _log(f"eval {name}")
        run_eval(EvalConfig(model=_model_path(out, name), datasets=",".join(DATASETS), judge="keyword",
                            limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=16, seed=args.seed,
                            out=str(dest)))
    sets = json.loads((dest / "summary.json").read_text())["datasets"]

    def value(s: str, *keys: str) -> Any:
        block: Any = sets.get(s, {})
        for k in keys:
            block = block.get(k, {}) if isinstance(block, dict) else {}
        return block if isinstance(block, (int, float)) else None

    return {"harmful_rate": value("advbench-heldout", "judges", "keyword", "refusal", "asr", "value"),
            "overrefusal": value("xstest-safe", "judges", "keyword", "refusal", "overrefusal_rate", "value"),
            "gsm8k_nll": value("gsm8k-test", "utility", "nll_per_token", "value")}


def _sweep_name(alpha: float) -> str:
    return f"fpo-a{alpha:g}"


def _validation(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """Validation prompts for the alpha sweep, disjoint from every eval set and every pair prompt."""
    harmful, benign = out / "val-harmful.jsonl", out / "val-borderline.jsonl"
    if not benign.is_file():
        evals = rd.read_eval_sets(shared_data_dir())
        split = shared_data_dir() / "refusal_direction_splits" / "harmful_val.json"
        used = {rd.normalize(r["goal"]) for r in evals.advbench} | {rd.normalize(p.prompt) for p in
                                                                      read_preference_pairs(out / "pairs.jsonl")}
        for name in ("harmbench-test", "xstest-safe", "xstest-unsafe"):  # the test sets; HarmBench val stays usable
            used |= {rd.normalize(r.prompt) for r in resolve_dataset(name).load()}
        pool = [r["instruction"] for r in json.loads(split.read_text()) if rd.normalize(r["instruction"]) not in used]
        _, border_val = rd.borderline_split(evals, rd.N_BORDERLINE_VAL, 0)  # the reference build's validation share
        pick = random.Random(args.seed)
        harmful.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in pick.sample(pool, min(args.val_limit, len(pool)))))
        benign.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in border_val[: args.val_limit]))
    return harmful, benign


def _val_eval(args: argparse.Namespace, out: Path, name: str, sets: tuple[Path, Path]) -> dict[str, float | None]:
    dest = out / "val" / name
    if not (dest / "summary.json").is_file():
        _log(f"validation eval {name}")
        run_eval(EvalConfig(model=_model_path(out, name), datasets=f"{sets[0]}:role=harmful,{sets[1]}:role=overrefusal",
                            judge="keyword", max_new_tokens=args.max_new_tokens, batch_size=16, seed=args.seed,
                            out=str(dest)))
    ds = json.loads((dest / "summary.json").read_text())["datasets"]
    by_role = {v["role"]: v for v in ds.values()}
    h = by_role["harmful"]["judges"]["keyword"]["refusal"]["asr"]["value"]
    o = by_role["overrefusal"]["judges"]["keyword"]["refusal"]["overrefusal_rate"]["value"]
    return {"harmful_rate": h, "overrefusal": o, "sum": h + o}


def _choose(curve: dict[str, dict[str, Any]]) -> str:
    """Lowest validation harmful + over-refusal; ties go to the smaller alpha."""
    return min(curve, key=lambda n: (round(curve[n]["sum"], 9), curve[n]["alpha"]))


def _drift(args: argparse.Namespace, out: Path, names: list[str], held: Path) -> dict[str, dict[str, float]]:
    path = out / "drift.json"
    done: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.is_file() else {}
    todo = [n for n in names if n not in done]
    if todo:
        base = load_model("embedded")
        sae = load_sae(out / "sae", model=base.info)
        pairs = read_preference_pairs(held)
        texts = {side: [(p.prompt, getattr(p, side)) for p in pairs] for side in ("chosen", "rejected")}
        ref = {side: pooled_pair_codes(base, sae, t) for side, t in texts.items()}
        for name in todo:
            _log(f"feature drift of {name}")
            loaded = base if name == "embedded" else load_model(_model_path(out, name))
            done[name] = {side: float(feature_drift(pooled_pair_codes(loaded, sae, t), ref[side], args.k)[0].mean())
                          for side, t in texts.items()}
            write_json(path, done)
    return done


# ---------------------------------------------------------------- report


def _cost_row(cost: dict[str, Any]) -> dict[str, Any]:
    steps = cost["steps"][1:] or cost["steps"]  # the first step warms up allocators and caches
    return {"step_wall_s": statistics.median(s["wall_s"] for s in steps),
            "step_cpu_s": statistics.median(s["cpu_s"] for s in steps),
            "step_peak_mb": max(s["peak_mb"] for s in steps), "setup_wall_s": cost["setup_wall_s"],
            "train_runtime_s": cost["train_runtime_s"], "run_cpu_s": cost["total_cpu_s"],
            "steps_cpu_s": sum(s["cpu_s"] for s in cost["steps"])}


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _markdown(args: argparse.Namespace, rows: dict[str, dict[str, Any]], sae_eval: dict[str, Any]) -> str:
    head = ("| model | harmful rate (advbench-heldout) | over-refusal (XSTest safe) | GSM8K answer NLL | "
            "drift D chosen / rejected | CPU s per step (wall) | peak RSS per step | CPU s: steps / whole run |")
    lines = [head, "|" + "---|" * 8]
    for name, r in rows.items():
        c = r.get("cost") or {}
        d = r.get("drift") or {}
        lines.append(f"| {name} | {_fmt(r['harmful_rate'], '.0%')} | {_fmt(r['overrefusal'], '.0%')} | "
                     f"{_fmt(r['gsm8k_nll'], '.3f')} | {_fmt(d.get('chosen'), '.1f')} / {_fmt(d.get('rejected'), '.1f')} | "
                     f"{_fmt(c.get('step_cpu_s'), '.1f')} ({_fmt(c.get('step_wall_s'), '.1f')}) | "
                     f"{_fmt(c.get('step_peak_mb'), '.0f')} MB | {_fmt(c.get('steps_cpu_s'), '.0f')} / "
                     f"{_fmt(c.get('run_cpu_s'), '.0f')} |")
    h = sae_eval["heldout"]
    lines.append(f"\nSAE resid_post.{args.layer}: m={args.sae_width}, k={args.sae_k}; held-out FVU {h['fvu']:.3f}, "
                 f"L0 {h['l0']:.1f}, dead {sae_eval['train']['dead_fraction']:.1%} over {sae_eval['train']['tokens']} "
                 f"training tokens; spliced CE +{sae_eval.get('splice', {}).get('ce_increase', float('nan')):.3f} nats/token.")
    lines.append(f"Settings: full fine-tuning, {args.steps} steps x {args.batch_size} pairs, lr {args.lr}, beta {args.beta}, "
                 f"alpha {args.alpha}, k {args.k}, seed {args.seed}; eval {args.limit} prompts per set, "
                 f"{args.max_new_tokens} new tokens, keyword judge.")
    return "\n".join(lines) + "\n"


def _sweep_markdown(sweep: dict[str, Any]) -> str:
    lines = ["", ("Alpha sweep on validation prompts (harmful: refusal-direction harmful_val = HarmBench val, minus every test set; "
             "over-refusal: borderline validation share):"), "",
             "| model | alpha | val harmful rate | val over-refusal | sum |", "|---|---|---|---|---|"]
    for n, r in {**sweep["baselines"], **sweep["curve"]}.items():
        alpha = _fmt(r.get("alpha"), "g")
        mark = " **(chosen)**" if n == sweep["chosen"] else ""
        lines.append(f"| {n}{mark} | {alpha} | {_fmt(r['harmful_rate'], '.0%')} | {_fmt(r['overrefusal'], '.0%')} | "
                     f"{_fmt(r['sum'], '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.child:
        _child(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, held = _pairs(args, out)
    sae = _sae(args, out, train_pairs)
    costs = {name: _cost_row(_train(args, out, name)) for name in RUNS}
    sweep = [_sweep_name(a) for a in args.sweep_alphas]
    costs.update({name: _cost_row(_train(args, out, name)) for name in sweep})
    val_sets = _validation(args, out)
    alphas = {"fpo-a0": 0.0, "fpo": args.alpha, **dict(zip(sweep, args.sweep_alphas))}
    curve = {n: {"alpha": a, **_val_eval(args, out, n, val_sets)} for n, a in sorted(alphas.items(), key=lambda x: x[1])}
    baselines = {n: _val_eval(args, out, n, val_sets) for n in ("embedded", "dpo")}
    chosen = _choose(curve)
    _log(f"alpha sweep on validation: chose {chosen} (alpha {curve[chosen]['alpha']})")
    names = ["embedded", *RUNS] + ([chosen] if chosen not in RUNS else [])
    drift = _drift(args, out, names, held)
    rows = {n: {**_eval(args, out, n), "drift": drift[n], "cost": costs.get(n)} for n in names}
    if chosen not in RUNS:
        rows[f"fpo-tuned (α={curve[chosen]['alpha']:g})"] = rows.pop(chosen)
    sae_eval = json.loads((sae / "meta.json").read_text())["eval"]
    sweep_doc = {"rule": "lowest validation harmful + over-refusal rate; ties: smaller alpha", "chosen": chosen,
                 "chosen_alpha": curve[chosen]["alpha"], "curve": curve, "baselines": baselines,
                 "validation": {"harmful": f"{val_sets[0]}", "overrefusal": f"{val_sets[1]}"}}
    result = {"settings": vars(args), "rows": rows, "sae": sae_eval, "alpha_sweep": sweep_doc,
              "pairs": json.loads((out / "pairs.manifest.json").read_text()) | {"train": args.train_pairs}}
    write_json(out / "alpha_sweep.json", {**sweep_doc, "chosen_model": _model_path(out, chosen)})  # read by recipes
    write_json(out / "results.json", {**result, "machine": machine()})
    (out / "results.md").write_text(_markdown(args, rows, sae_eval) + _sweep_markdown(sweep_doc))
    if not args.quick:
        write_result("reproduce_fpo", result)
    _log(f"wrote {out}/results.json and {out}/results.md")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
