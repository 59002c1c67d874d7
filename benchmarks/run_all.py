"""Run every benchmarks/bench_*.py, then print one table of ratios against their goals.

Each script runs in its own process (OMP_NUM_THREADS=1 unless set) and writes its JSON record;
this script reads those records, maps the known keys to the goals below and writes one summary
with date, machine and command: benchmarks/results.json (full settings), results-quick.json
(--quick: small settings, per-script records under results/quick/ so full results are never
overwritten), results-gpu.json (--device cuda). A script that is expected but absent shows
"missing", one that fails shows "failed" with its log, a key a script does not write shows
"not in output"; nothing is filled in.

  .venv/bin/python benchmarks/run_all.py [--quick] [--only taps,steer] [--skip train]
  .venv/bin/python benchmarks/run_all.py --collect          # no runs: the table from the last records
  .venv/bin/python benchmarks/run_all.py --device cuda --model-config llama3-8b   # GPU machine

Scripts built on `_common.add_model_args` get --device/--model-config; others are not run in a
GPU run. A script may declare `QUICK_ARGS = [...]` (a literal list) for --quick; otherwise the
table below applies, else `--rounds 3` when it takes --rounds.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as dt
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine

HERE = Path(__file__).parent
# The scripts issue 12 lists; one that does not exist yet shows as "missing".
EXPECTED = ("taps", "eval", "steer", "train", "lock", "mogu", "attack", "peers", "reproduce")
QUICK = {
    "taps": ["--rounds", "3", "--batch", "8"],
    "eval": ["--rounds", "2", "--prompts", "8", "--max-new-tokens", "16"],
    "steer": ["--rounds", "3", "--batch", "4", "--new-tokens", "16"],
    "train": ["--rounds", "2", "--steps", "2", "--batch", "2"],
    "lock": ["--rounds", "3", "--batch", "4", "--tokens", "16"],
    "mogu": ["--rounds", "2", "--batch", "4", "--new-tokens", "16"],
    "peers": ["--rounds", "3", "--batch", "4", "--new-tokens", "16", "--capture-batch", "8"],
}


@dataclass(frozen=True)
class Goal:
    """One row: a value in one script's record (dotted key, or a regex over its keys) against a goal.

    op: '<=' / '>=' (threshold), '~1' (equal to 1 within max(0.03, the control's deviation)),
    'true' (a flag that must hold), 'info' (no goal), 'script' (the threshold is parsed from the
    record's own `goal` text).
    """

    label: str
    script: str
    key: str
    op: str
    goal: float | None = None
    cpu: str | None = None  # may contain {key}: the matched key
    control: str | None = None
    cpu_control: str | None = None
    unit: str = ""
    each: bool = False  # one row per key the `re:` pattern matches
    note: str | None = None  # the goal column's text for an 'info' row (default: the peer-ratio reading)
    gpu_goal: float | None = None  # the threshold on a GPU run, where the issue sets a stricter one

    def on(self, gpu: bool) -> Goal:
        return dataclasses.replace(self, goal=self.gpu_goal) if gpu and self.gpu_goal is not None else self


GOALS = (
    Goal("capture ÷ plain forward (all-layer last-token capture)", "taps", "capture_over_plain", "<=", 1.15,
         control="control_plain_over_plain"),
    Goal("steered ÷ plain generate: `add` hook", "steer", "steered_add_over_plain", ">=", 0.97, gpu_goal=0.98,
         cpu="cpu_time.steered_add_over_plain", control="plain_control_over_plain", cpu_control="cpu_time.plain_control_over_plain"),
    Goal("steered ÷ plain generate: `ablate` hooks", "steer", "steered_ablate_over_plain", ">=", 0.97, gpu_goal=0.98,
         cpu="cpu_time.steered_ablate_over_plain", control="plain_control_over_plain", cpu_control="cpu_time.plain_control_over_plain"),
    Goal("exported ÷ plain generate: `add` baked", "steer", "exported_add_over_plain", "~1",
         cpu="cpu_time.exported_add_over_plain", control="plain_control_over_plain", cpu_control="cpu_time.plain_control_over_plain"),
    Goal("exported ÷ plain generate: `ablate` baked", "steer", "exported_ablate_over_plain", "~1",
         cpu="cpu_time.exported_ablate_over_plain", control="plain_control_over_plain", cpu_control="cpu_time.plain_control_over_plain"),
    Goal("eval harness ÷ raw generate", "eval", "harness_over_raw", ">=", 0.95, control="control_raw_over_raw"),
    Goal("`train --method sft` ÷ bare TRL SFTTrainer", "train", "latentguard_over_bare_steps_per_s", ">=", 0.95,
         cpu="cpu_latentguard_over_bare_runs_per_s", control="control_bare_over_bare", cpu_control="cpu_control_bare_over_bare"),
    Goal("ProCon ÷ SFT, training step time", "train", r"re:^(?!cpu)(?!.*control)[\w.]*procon\w*_over_\w*sft\w*$", "script",
         cpu=r"re:^(cpu[\w.]*procon|[\w.]*cpu\w*\.procon)\w*_over_\w*sft\w*$"),
    Goal("ML-LR ÷ SFT, training step time", "train", r"re:^(?!cpu)(?!.*control)[\w.]*(ml_?lr|swat)\w*_over_\w*sft\w*$", "script",
         cpu=r"re:^(cpu[\w.]*(ml_?lr|swat)|[\w.]*cpu\w*\.(ml_?lr|swat))\w*_over_\w*sft\w*$"),
    Goal("SafetyLock create (model load excluded)", "lock", "create.wall_s", "<=", 60.0, unit=" s"),
    Goal("SafetyLock apply (fold into o_proj bias, median)", "lock", "apply.fold_median_s", "<=", 0.01, unit=" s"),
    Goal("locked ÷ plain generate: hooked", "lock", "tok_per_s_ratio.hooked_over_plain", ">=", 0.97,
         control="tok_per_s_ratio.control_plain_over_plain"),
    Goal("locked ÷ plain generate: folded", "lock", "tok_per_s_ratio.folded_over_plain", "~1",
         control="tok_per_s_ratio.control_plain_over_plain"),
    Goal("MoGU ÷ plain generate", "mogu", r"re:^(?!plain_control)\w+_over_plain$", "script", cpu="cpu_time.{key}",
         control="plain_control_over_plain", cpu_control="cpu_time.plain_control_over_plain", each=True),
    Goal("latentguard ÷ steering-vectors, steering tok/s", "peers", "latentguard_over_steering_vectors", "info",
         cpu="steering.cpu_time.latentguard_over_peer.steering_vectors"),
    Goal("  greedy output equal to steering-vectors", "peers", "steering.greedy_equal_to_latentguard.steering_vectors", "true"),
    Goal("latentguard ÷ repeng, steering tok/s", "peers", "latentguard_over_repeng", "info",
         cpu="steering.cpu_time.latentguard_over_peer.repeng"),
    Goal("  greedy output equal to repeng", "peers", "steering.greedy_equal_to_latentguard.repeng", "true"),
    Goal("  steering changes the output (else equality is void)", "peers", "steering.steered_differs_from_plain", "true"),
    Goal("latentguard ÷ nnsight, capture speed", "peers", "latentguard_over_nnsight_capture", "info",
         cpu="capture.cpu_time.latentguard_over_nnsight_speed"),
    Goal("  captured values equal to nnsight's (max |diff| = 0)", "peers", "capture.max_abs_diff", "<=", 0.0),
    Goal("RADIAL attack construction (pool of 500, embedded model)", "attack", "radial_construction_s", "info",
         unit=" s", cpu="radial_construction_cpu_s", note="none (issue 10: measure)"),
    Goal("  its share of one eval run (construction ÷ construction + eval)", "attack", "radial_share_of_eval", "info",
         note="none (issue 10: measure)"),
    Goal("  shared prompt cache ÷ full forwards, tendency scoring speed", "attack", "shared_cache_vs_full_forward.speedup_wall",
         "info", cpu="shared_cache_vs_full_forward.speedup_cpu", note="none (> 1: the cache is faster)"),
    Goal("reproduce --jobs 2 ÷ --jobs 1 wall (quick recipe)", "reproduce", "jobs_over_serial_wall", "<=", 0.8),
    Goal("  CPU seconds, --jobs 2 ÷ --jobs 1 (the work itself)", "reproduce", "cpu_jobs_over_serial", "info",
         note="none (≈ 1: no work added)"),
    Goal("  same results table", "reproduce", "same_results", "true"),
)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _lookup(flat: dict[str, Any], key: str | None) -> tuple[str | None, Any]:
    """(matched key, value) for a dotted key or an `re:` pattern (first match in sorted order)."""
    if key is None:
        return None, None
    if key.startswith("re:"):
        hits = sorted(k for k in flat if re.search(key[3:], k) and isinstance(flat[k], (int, float)))
        return (hits[0], flat[hits[0]]) if hits else (None, None)
    return (key, flat[key]) if key in flat else (None, None)


_CLAUSE = re.compile(r"([\w*./]+)\s*(<=|>=|≤|≥|==|=|<|>)\s*(-?[0-9]*\.?[0-9]+)")


def _goal_from_text(text: str, key: str) -> tuple[str, float] | None:
    """('>=', 0.9) from a record's goal text such as 'procon_over_sft >= 0.9' naming `key`."""
    leaf = key.rsplit(".", 1)[-1]
    for lhs, op, num in _CLAUSE.findall(text or ""):
        if fnmatch.fnmatch(leaf, lhs) or fnmatch.fnmatch(key, lhs) or lhs in leaf:
            op = {"≤": "<=", "≥": ">=", "==": "~1" if float(num) == 1 else "==", "=": "~1" if float(num) == 1 else "=="}.get(op, op)
            return op, float(num)
    return None


def _judge(op: str, goal: float | None, value: Any, control: Any) -> str:
    if value is None:
        return "not in output"
    if op == "info":
        return "—"
    if op == "true":
        return "ok" if value is True else "MISSED"
    if op == "~1":
        tol = max(0.03, abs(control - 1) if isinstance(control, (int, float)) else 0.0)
        return "ok" if abs(value - 1) <= tol else "MISSED"
    ok = {"<=": value <= goal, ">=": value >= goal, "<": value < goal, ">": value > goal, "==": value == goal}[op]
    return "ok" if ok else "MISSED"


def _goal_text(op: str, goal: float | None, unit: str, note: str | None = None) -> str:
    if op == "info":
        return note or "none (> 1: latentguard faster)"
    if op == "true":
        return "true"
    if op == "~1":
        return "≈ 1 (± 0.03, or the control's deviation if larger)"
    return f"{ {'<=': '≤', '>=': '≥'}.get(op, op)} {goal:g}{unit}"


def _rows(g: Goal, rec: dict[str, Any] | None, script_status: str, use_cpu: bool) -> list[dict[str, Any]]:
    """The goal's row(s) from one record: one per matching key with `each`, else the first match."""
    base: dict[str, Any] = {"label": g.label, "script": f"bench_{g.script}", "key": None, "value": None, "cpu": None,
                            "control": None, "unit": g.unit, "status": script_status,
                            "goal": _goal_text(g.op, g.goal, g.unit, g.note) if g.op != "script" else "set by the script"}
    if rec is None:
        return [base]
    flat = _flatten(rec)
    if g.each and g.key.startswith("re:"):
        keys = sorted(k for k in flat if re.search(g.key[3:], k) and isinstance(flat[k], (int, float)))
    else:
        keys = [k for k in [_lookup(flat, g.key)[0]] if k is not None]
    if not keys:
        return [{**base, "status": "not in output"}]
    return [_row(g, rec, flat, k, use_cpu) for k in keys]


def _row(g: Goal, rec: dict[str, Any], flat: dict[str, Any], key: str, use_cpu: bool) -> dict[str, Any]:
    value = flat[key]
    cpu = _lookup(flat, g.cpu.format(key=key) if g.cpu else None)[1]
    control, cpu_control = _lookup(flat, g.control)[1], _lookup(flat, g.cpu_control)[1]
    op, goal, goal_text = g.op, g.goal, None
    if op == "script":
        parsed = _goal_from_text(str(rec.get("goal", "")), key)
        op, goal = parsed if parsed else ("info", None)
        if not parsed:
            goal_text = f"none parsed from: {rec['goal']}" if rec.get("goal") else f"none set by bench_{g.script}"
    judged_on_cpu = use_cpu and cpu is not None and isinstance(value, (int, float))
    return {"label": f"{g.label}: {key}" if g.each else g.label, "script": f"bench_{g.script}", "key": key,
            "value": value, "cpu": cpu, "control": control, "cpu_control": cpu_control, "unit": g.unit,
            "goal": goal_text or _goal_text(op, goal, g.unit, g.note), "judged_on": "cpu" if judged_on_cpu else "wall",
            "status": _judge(op, goal, cpu if judged_on_cpu else value, cpu_control if judged_on_cpu else control)}


def _extra_rows(name: str, rec: dict[str, Any], known: set[str]) -> list[dict[str, Any]]:
    """Rows for a script no goal names (e.g. a new bench_x.py): its top-level `*_over_*` numbers."""
    rows = []
    for k, v in rec.items():
        if "_over_" in k and isinstance(v, (int, float)) and k not in known and "control" not in k:
            parsed = _goal_from_text(str(rec.get("goal", "")), k)
            op, goal = parsed if parsed else ("info", None)
            rows.append({"label": k, "script": name, "key": k, "value": v, "cpu": None, "control": None,
                         "goal": _goal_text(op, goal, ""), "status": _judge(op, goal, v, rec.get("control"))})
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.1 and v != 0 else f"{v:.3f}"
    return str(v)


def table(rows: list[dict[str, Any]], scripts: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    head = ["benchmark", "value", "CPU time", "control", "goal", "status", "record"]
    body = []
    for r in rows:
        s = scripts.get(r["script"], {})
        body.append([r["label"], _fmt(r["value"]) + (r.get("unit", "") if r["value"] is not None else ""), _fmt(r["cpu"]), _fmt(r.get("cpu_control") if r.get("judged_on") == "cpu" else r["control"]),
                     r["goal"] or "", r["status"], f"{r['script']} {(s.get('result_date') or '')[:10]}".strip()])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)])


def _names(spec: str) -> set[str]:
    return {x.strip().removeprefix("bench_").removesuffix(".py") for x in spec.split(",") if x.strip()}


def _skipped(names: list[str], only: str | None, skip: str | None) -> list[str]:
    """Scripts left out by --only / --skip."""
    return [n for n in names if (only and n not in _names(only)) or (skip and n in _names(skip))]


def _script_args(name: str, src: str, args: argparse.Namespace) -> list[str] | None:
    """Arguments for one script, or None when it cannot take this run's --device/--model-config."""
    out: list[str] = []
    if args.quick:
        declared = re.search(r"^QUICK_ARGS\s*=\s*(\[.*?\])", src, re.MULTILINE | re.DOTALL)
        if declared:
            out += [str(x) for x in ast.literal_eval(declared.group(1))]
        elif name in QUICK:
            out += QUICK[name]
        elif '"--rounds"' in src:
            out += ["--rounds", "3"]
    if args.device != "cpu" or args.model_config:
        if "add_model_args(" not in src:
            return None
        out += ["--device", args.device] + (["--model-config", args.model_config] if args.model_config else [])
    return out


def _result_file(results: Path, name: str, args: argparse.Namespace) -> Path:
    base = f"bench_{name}" + ("_gpu" if args.device != "cpu" else "") + (f"_{args.model_config}" if args.model_config else "")
    return results / f"{base}.json"


def run_script(name: str, script: Path, args: argparse.Namespace, results: Path) -> dict[str, Any]:
    src = script.read_text()
    extra = _script_args(name, src, args)
    if extra is None:
        return {"status": "not run: no --device/--model-config options (use _common.add_model_args)"}
    cmd = [sys.executable, str(script.relative_to(HERE.parent)), *extra]
    env = {**os.environ, "LATENTGUARD_BENCH_RESULTS": str(results)}
    env.setdefault("OMP_NUM_THREADS", "1")
    log = results / "logs" / f"bench_{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out_file = _result_file(results, name, args)
    print(f"[run_all] {' '.join(['python', *cmd[1:]])}  (log: {_rel(log)})", flush=True)
    t0, started = time.perf_counter(), time.time()
    try:
        with log.open("w") as f:
            rc = subprocess.run(cmd, cwd=HERE.parent, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout,
                                check=False).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    info: dict[str, Any] = {"command": " ".join(["python", *cmd[1:]]), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
                            "log": _rel(log)}
    fresh = out_file.is_file() and out_file.stat().st_mtime >= started
    if rc != 0 or not fresh:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        why = f"exit {rc}" if rc != 0 else f"exit 0 but no new {out_file.name}"
        return {**info, "status": f"failed ({why})", "error_tail": tail}
    return {**info, "status": "ran", "result_file": _rel(out_file)}


def _rel(path: Path) -> str:
    """A path relative to the repository when inside it (how records and logs are named), else absolute."""
    path = path.resolve()
    return str(path.relative_to(HERE.parent.resolve())) if path.is_relative_to(HERE.parent.resolve()) else str(path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings (rounds, batch, tokens) for a fast pass")
    ap.add_argument("--only", help="comma list of scripts to run (taps,steer or bench_taps,...)")
    ap.add_argument("--skip", help="comma list of scripts not to run")
    ap.add_argument("--collect", action="store_true", help="run nothing; build the table from the last records")
    ap.add_argument("--device", default="cpu", help="passed to scripts that take it; cuda writes results-gpu.json")
    ap.add_argument("--model-config", default=None, help="random-init shape passed to scripts (e.g. llama3-8b)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per script")
    ap.add_argument("--out", type=Path, default=None, help="summary path (default: results.json / results-quick.json / results-gpu.json)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args()

    gpu = args.device != "cpu"
    results = RESULTS / ("quick" if args.quick else "")  # $LATENTGUARD_BENCH_RESULTS moves it
    out = args.out or HERE / ("results-gpu.json" if gpu else "results-quick.json" if args.quick else "results.json")
    present = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    names = sorted(set(present) | set(EXPECTED), key=lambda n: (EXPECTED.index(n) if n in EXPECTED else len(EXPECTED), n))
    skipped = _skipped(names, args.only, args.skip)
    scripts: dict[str, dict[str, Any]] = {}
    for n in names:
        key = f"bench_{n}"
        if n not in present:
            scripts[key] = {"status": "missing (no benchmarks/" + key + ".py)"}
        elif n in skipped:
            scripts[key] = {"status": "not run (--only/--skip)"}
        elif args.collect:
            path = _result_file(results, n, args)
            scripts[key] = {"status": "collected", "result_file": _rel(path)} if path.is_file() else {"status": "no record"}
        else:
            scripts[key] = run_script(n, HERE / f"{key}.py", args, results)
        rec = _read(HERE.parent / scripts[key]["result_file"]) if "result_file" in scripts[key] else None
        scripts[key]["record"] = rec
        if rec:
            scripts[key].update(result_date=rec.get("date_utc"), result_command=rec.get("command"))

    rows = []
    for g in GOALS:
        s = scripts.get(f"bench_{g.script}", {"status": "missing"})
        rows += _rows(g.on(gpu), s.get("record"), s["status"], use_cpu=not gpu)
    named = {g.script for g in GOALS}
    known_keys = {g.key for g in GOALS}
    for n in names:
        rec = scripts[f"bench_{n}"].get("record")
        if n not in named:
            extra = _extra_rows(f"bench_{n}", rec, known_keys) if rec else []
            rows += extra or [{"label": f"bench_{n}", "script": f"bench_{n}", "key": None, "value": None, "cpu": None,
                               "control": None, "goal": "", "status": scripts[f"bench_{n}"]["status"] if not rec
                               else "record has no top-level *_over_* ratio"}]

    mach = machine()
    summary = {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "mode": "collect" if args.collect else "quick" if args.quick else "full",
        "device": args.device, "model_config": args.model_config,
        "machine": {k: mach[k] for k in ("cpu_model", "cpu_count", "platform", "python", "torch", "torch_threads", "device", "load_avg")}
        | {"omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1 (set per script)")},
        "judged_on": "CPU time where a script records it (steadier on a shared CPU), else wall time" if not gpu else "wall time",
        "scripts": {k: {kk: vv for kk, vv in v.items() if kk != "record"} for k, v in scripts.items()},
        "rows": rows,
    }
    summary["table_markdown"] = table(rows, scripts, markdown=True)
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print()
    print(f"{summary['date_utc']}  {mach['cpu_model']}, {mach['cpu_count']} cores, python {mach['python']}, "
          f"torch {mach['torch']}  mode={summary['mode']}")
    print(f"command: {summary['command']}")
    print(table(rows, scripts, markdown=args.markdown))
    for k, v in scripts.items():
        if v["status"] not in ("ran", "collected"):
            print(f"{k}: {v['status']}" + (f"; log {v['log']}: {' | '.join(v.get('error_tail', []))}" if v.get("log") else ""))
    print(f"-> {_rel(out)}")


if __name__ == "__main__":
    main()
