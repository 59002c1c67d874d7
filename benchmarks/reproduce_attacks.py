"""Reproduce issue 10: the attack × defence matrix (harmful rate beside over-refusal) on one model.

Steps (each skipped when its output exists, so a rerun resumes; logs in OUT/logs/):
1. `latentguard direction extract` on --model  -> OUT/direction/direction (ablate attack; add and
   conditional defences);
2. `latentguard lock create` on --model         -> OUT/lock (SafetyLock defence);
3. `latentguard attack radial` on --model       -> OUT/radial (the ranking, chosen instructions, prompts);
3b. the harmful fine-tune: --harmful-ft DIR if given (default for --model refs/aligned:
   refs/aligned-harmfulft), else `latentguard train` on AdvBench goal -> target rows drawn only from
   the 117 goals of the refusal-direction train split (never advbench-heldout) -> OUT/harmful-ft;
4. `latentguard eval --attack A --defense D`    -> OUT/matrix (resumable cell by cell), with
   A = none, radial (k=2: attack A), radial k=4 (attack B), the template families, ablate, harmful-ft;
   D = none, add (alpha 1), conditional, lock (alpha --lock-alpha), plus `--defense-extra SPEC` columns (e.g. MoGU:
   `mogu:DIR`) when given;
5. one more eval per `--model-row NAME=DIR` (a trained defence such as ProCon is another model): attacks
   none, radial (ranked on that model inside the run) and the templates; ablate / harmful-ft are
   artefacts of --model and stay empty there;
6. OUT/results.json, OUT/results.md (README table) and OUT/report.html (heat maps of every run).

  .venv/bin/python benchmarks/reproduce_attacks.py --model refs/aligned --out out/attacks
  .venv/bin/python benchmarks/reproduce_attacks.py --model embedded --out out/attacks-quick --quick
  .venv/bin/python benchmarks/reproduce_attacks.py --model refs/aligned --out out/attacks \\
      --model-row procon=out/procon/models/procon-mix --defense-extra mogu:out/mogu/artefact
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEMPLATES = ("roleplay", "prefix-injection", "refusal-suppression", "payload-splitting", "base64", "completion",
             "distractor")
QUICK_TEMPLATES = ("prefix-injection", "base64")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="refs/aligned", help="the model under attack (and defended)")
    ap.add_argument("--harmful-ft", default=None, help="harmful fine-tune of --model (default: refs/aligned-harmfulft "
                    "for refs/aligned, else trained here); 'skip' to leave the row out")
    ap.add_argument("--harmful-ft-steps", type=int, default=26, help="steps of the harmful fine-tune trained here")
    ap.add_argument("--out", default="out/attacks", help="output folder (rerun to resume)")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 16 new tokens, pool 12, two templates, small artefacts")
    ap.add_argument("--limit", type=int, default=32, help="prompts per data set (advbench-heldout, xstest-safe)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="RADIAL answers the benign items first: keep >= 128")
    ap.add_argument("--pool", type=int, default=500, help="RADIAL pool size")
    ap.add_argument("--templates", default=",".join(TEMPLATES), help="template families (comma list)")
    ap.add_argument("--defense-extra", action="append", default=[], help="extra defence column spec (repeatable)")
    ap.add_argument("--model-row", action="append", default=[], help="NAME=DIR: a trained-defence model as its own row")
    ap.add_argument("--judge", default="keyword")
    ap.add_argument("--keyword-mode", default="head", help="keyword judge mode: head (default here: catches a refusal "
                    "after a quote, speaker tag or 'Sure' preamble, common in attacked answers), anchored or substring")
    ap.add_argument("--lock-alpha", type=float, default=2.0,
                    help="SafetyLock strength (2: chosen by `lock tune` in docs/safetylock.md; the paper's 6 degenerates here)")
    args = ap.parse_args(argv)
    if args.quick:
        args.limit, args.max_new_tokens, args.pool, args.harmful_ft_steps = 4, 16, 12, 2
        if args.templates == ",".join(TEMPLATES):
            args.templates = ",".join(QUICK_TEMPLATES)
    return args


def _cli(cmd: list[str], out: Path, name: str, creates: Path | None) -> float:
    """Run one latentguard command in its own process (memory returned, crash named); skip if done."""
    if creates is not None and creates.exists():
        print(f"[attacks] {name}: done, skipped")
        return 0.0
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[attacks] {name}: latentguard {' '.join(cmd)}")
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "latentguard.cli.main", *cmd], stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"[attacks] {name} failed (exit {rc}); log {log}:\n{tail}")
    return round(time.perf_counter() - t0, 1)


def _artefacts(args: argparse.Namespace, out: Path) -> dict[str, float]:
    q = args.quick
    direction = ["direction", "extract", "--model", args.model, "--positions=-1", "--kl-threshold", "1",
                 "--out", str(out / "direction")]
    if q:  # the embedded model barely refuses: no refusal-proxy filter, and no candidate induces refusal
        direction += ["--n-train", "16", "--n-val", "8", "--layers", "8:24:4", "--no-filter-train", "--no-filter-val",
                      "--induce-threshold", "-100"]
    else:
        direction += ["--n-train", "64", "--n-val", "16", "--layers", "0:24:2"]
    lock = ["lock", "create", "--model", args.model, "--out", str(out / "lock")] + (["--n-pairs", "60", "--k", "8"] if q else [])
    radial = ["attack", "radial", "--model", args.model, "--pool-size", str(args.pool), "--limit", str(args.limit),
              "--out", str(out / "radial")]
    return {
        "direction": _cli(direction, out, "direction", out / "direction" / "direction" / "meta.json"),
        "lock": _cli(lock, out, "lock", out / "lock" / "meta.json"),
        "radial": _cli(radial, out, "radial", out / "radial" / "ranking" / "meta.json"),
    }


def _harmful_ft(args: argparse.Namespace, out: Path) -> str | None:
    """The harmful fine-tune of --model: given, the reference one, or a short LoRA run trained here."""
    if args.harmful_ft == "skip":
        return None
    if args.harmful_ft:
        return str(args.harmful_ft)
    if Path(args.model).resolve() == Path("refs/aligned").resolve() and Path("refs/aligned-harmfulft").is_dir():
        return "refs/aligned-harmfulft"
    from latentguard.eval.datasets import shared_data_dir
    from latentguard.training.reference_data import harmful_ft_pairs, read_eval_sets

    data = out / "harmful_ft.jsonl"
    if not data.is_file():
        pairs = harmful_ft_pairs(read_eval_sets(shared_data_dir()), 16 if args.quick else 100, 42)
        data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    cmd = ["train", "--model", args.model, "--data", str(data), "--out", str(out / "harmful-ft"), "--max-steps",
           str(args.harmful_ft_steps), "--batch-size", "8", "--lr", "2e-4", "--lora", "r=8,alpha=16,targets=q,k,v,o",
           "--save-steps", str(args.harmful_ft_steps)]
    _cli(cmd, out, "harmful-ft", out / "harmful-ft" / "adapter" / "adapter_config.json")
    return str(out / "harmful-ft")


def _eval(args: argparse.Namespace, out: Path, name: str, model: str, attacks: list[str], defenses: list[str]) -> float:
    cmd = ["eval", "--model", model, "--datasets", "advbench-heldout,xstest-safe", "--limit", str(args.limit),
           "--max-new-tokens", str(args.max_new_tokens), "--judge", args.judge, "--keyword-mode", args.keyword_mode,
           "--attack", ",".join(attacks),
           "--defense", ",".join(defenses), "--out", str(out / name)]
    return _cli(cmd, out, name, None)  # eval resumes itself cell by cell


def _table(run: Path, row_prefix: str = "") -> list[dict[str, Any]]:
    m = json.loads((run / "summary.json").read_text())["matrix"]
    rows = []
    for d in m["defenses"]:
        cells = {a["label"]: m["harmful_rate"][a["label"]].get(d["label"], {}).get("value") for a in m["attacks"]}
        rows.append({"row": row_prefix + d["label"], "harmful_rate": cells,
                     "overrefusal": m["overrefusal"].get(d["label"], {}).get("value")})
    return rows


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r["harmful_rate"]))

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.0f} %"

    head = "| defence | " + " | ".join(cols) + " | over-refusal |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(pct(r["harmful_rate"].get(c)) for c in cols) + f" | {pct(r['overrefusal'])} |")
    note = (f"\nHarmful rate on advbench-heldout ({args.limit} prompts), over-refusal on xstest-safe ({args.limit}); "
            f"judge {args.judge} ({args.keyword_mode}), greedy, {args.max_new_tokens} new tokens; model {args.model}; "
            "'—': no judgeable response (all empty).\n")
    return "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = _artefacts(args, out)
    d = out / "direction" / "direction"
    attacks = ["none", f"radial:{out / 'radial'}", f"radial:{out / 'radial'},k=4", *args.templates.split(","),
               f"ablate:{d}"]
    ft = _harmful_ft(args, out)
    if ft is not None:
        attacks.append(f"harmful-ft:{ft}")
    defenses = ["none", f"add:{d},alpha=1", f"conditional:{d}", f"lock:{out / 'lock'},alpha={args.lock_alpha}",
                *args.defense_extra]
    timings["matrix"] = _eval(args, out, "matrix", args.model, attacks, defenses)
    rows = _table(out / "matrix")
    runs = [out / "matrix"]
    for spec in args.model_row:
        name, _, path = spec.partition("=")
        pool = f"radial,pool_size={args.pool}"
        timings[f"row-{name}"] = _eval(args, out, f"row-{name}", path, ["none", pool, f"{pool},k=4", *args.templates.split(",")],
                                       ["none"])
        rows += _table(out / f"row-{name}", row_prefix=f"{name} model / ")
        runs.append(out / f"row-{name}")
    _cli(["report", *map(str, runs), "--out", str(out / "report.html")], out, "report", None)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "timings_s": timings}, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(rows, args))
    print((out / "results.md").read_text())
    print(f"[attacks] wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'report.html'}")


if __name__ == "__main__":
    main()
