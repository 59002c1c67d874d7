"""`latentguard reproduce --config RECIPE.yaml [--quick]`: the one-command reproduction table.

A recipe (YAML, see configs/reproduce/) has three parts:
- `steps`: commands that build models and artefacts, in order — `run:` a latentguard command line,
  or `python:` a script line (benchmarks/...). A step with `creates: PATH` is skipped when PATH
  exists, so a rerun resumes where the last one stopped; each step's output goes to
  OUT/logs/<step>.log.
- `eval`: `latentguard eval` settings shared by every row (suite, datasets, limit, judge, ...).
- `rows`: one `latentguard eval` run each (`model`, optional `defense`, optional per-row `eval`
  overrides, `group` for the table). Eval runs resume themselves; a finished row is skipped.
`{out}` in any string is replaced by the output folder, `{env:NAME:-DEFAULT}` by an environment variable
(e.g. where a large model's local weights live; no default and unset is an error); `{json:PATH#KEY}`, in a
row's model or defence, by a value a step wrote (e.g. the alpha `lock tune` chose). `quick:` is merged over the recipe by
`--quick` (small limits; CI-scale smoke runs). Every step and row runs as its own process, so a
model's memory is returned between them and a crash names the stage.

`needs:` on a step or row lists the steps it waits for (default: every earlier step for a step,
every step for a row), so `--jobs N` runs up to N independent stages at once (one torch thread
each: `--jobs 2` on a 2-core machine roughly halves the wall time). `--jobs 1` runs them in
recipe order. When a stage fails, no new stage starts; running ones finish, then the run stops
naming the failed stage.

A finished stage is reused only while what it was built from is unchanged (make's rule, by model
fingerprint instead of file time) and its command is the one it ran (ninja's rule). OUT/stamps.json
records, per finished stage, its command (interpreter dropped, the output folder as {out}), when it
finished, which run of each needed step it used, and for a step the fingerprints of its `inputs:`
(default: a `run:` step's `--model`). A row is stale when its model's fingerprint differs from the
one its eval run recorded, or an artefact it applied (defence or attack) now belongs to another
model; a step is stale when an input's fingerprint changed (a step finished before stamps existed:
the model its artefact meta.json names); either is stale when a step it needs is stale, runs again,
or ran again since (also in a run that left this stage out, e.g. with --only). Steps without
`creates:` run every time and are not tracked; a fingerprint that cannot be told (the model is gone
or does not load) never makes a stage stale. Stale stages stop the run with one line naming them;
`--rerun-stale` moves their outputs (rows: OUT/eval/ROW; steps: `outputs:`, default the step's
`--out`) to OUT/stale/TIME/ and runs them again. Fingerprints are cached by file size and mtime in
OUT/fingerprints.json (not written by --dry-run), so a check loads each model once.

Writes OUT/results.json (per-row harmful rate per set, over-refusal, GSM8K answer NLL, wall and CPU
time, run directories), OUT/timings.json and OUT/cpu_timings.json (seconds per stage),
OUT/results.md (the README table) and OUT/report.html (the eval report of all rows: Pareto plot,
per-set tables, attack x defence heat maps where rows have them).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from latentguard import __version__
from latentguard.artifacts import git_commit, write_json
from latentguard.cli.options import read_yaml_mapping
from latentguard.errors import ConfigError, DataError
from latentguard.eval.matrix import pick_rate
from latentguard.eval.report import write_eval_report

__all__ = ["Recipe", "command", "find_stale", "load_recipe", "plan", "projected_wall_s", "run_recipe", "step_inputs", "step_outputs",
           "summarize_row"]

_LATENTGUARD = [sys.executable, "-m", "latentguard.cli.main"]


@dataclass
class Recipe:
    name: str
    out: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {k: _merge(base.get(k), v) if k in base else v for k, v in {**base, **over}.items()}
    return over


_ENV_REF = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _env(m: re.Match[str]) -> str:
    name, default = m.group(1), m.group(2)
    if name in os.environ:
        return os.environ[name]
    if default is None:
        raise ConfigError(f"The recipe needs ${name} ({m.group(0)}); set it, e.g. {name}=/path/to/local/weights.")
    return default


def _subst(value: Any, out: str) -> Any:
    if isinstance(value, str):
        return _ENV_REF.sub(_env, value.replace("{out}", out))
    if isinstance(value, list):
        return [_subst(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, out) for k, v in value.items()}
    return value


def load_recipe(path: str | Path, quick: bool = False, out: str | None = None) -> Recipe:
    """Read and check a recipe; every problem is one line naming the fix, before anything runs."""
    path = Path(path)
    raw = read_yaml_mapping(path, "Recipe", "pass --config configs/reproduce/embedded.yaml or your own file",
                            "a mapping with steps, eval and rows")
    if quick:
        if "quick" not in raw:
            raise ConfigError(f"Recipe {path} has no `quick:` section; add one or run without --quick.")
        raw = _merge(raw, raw["quick"])
    raw.pop("quick", None)
    unknown = set(raw) - {"name", "description", "out", "steps", "eval", "rows"}
    if unknown:
        raise ConfigError(f"Recipe {path}: unknown keys {sorted(unknown)}; use name, description, out, steps, eval, rows, quick.")
    out_dir = out or raw.get("out") or f"results/{raw.get('name', path.stem)}"
    raw = _subst(raw, str(out_dir))
    recipe = Recipe(name=str(raw.get("name", path.stem)), out=Path(out_dir), steps=list(raw.get("steps") or []),
                    eval=dict(raw.get("eval") or {}), rows=list(raw.get("rows") or []), description=str(raw.get("description", "")))
    _check(recipe, path)
    return recipe


def _check(recipe: Recipe, path: Path) -> None:
    names = [s.get("name") for s in recipe.steps] + [r.get("name") for r in recipe.rows]
    if any(not isinstance(n, str) or not n for n in names):
        raise ConfigError(f"Recipe {path}: every step and row needs a `name`.")
    if len(set(names)) != len(names):
        raise ConfigError(f"Recipe {path}: step and row names must be unique; rename the duplicates.")
    for s in recipe.steps:
        if ("run" in s) == ("python" in s):
            raise ConfigError(f"Recipe {path}: step {s['name']!r} needs exactly one of `run:` (latentguard command) or `python:` (script).")
    for r in recipe.rows:
        if "model" not in r:
            raise ConfigError(f"Recipe {path}: row {r['name']!r} has no `model`; add one (e.g. model: embedded).")
    if not recipe.rows:
        raise ConfigError(f"Recipe {path} has no rows; add at least one `rows:` entry to evaluate.")
    earlier: list[str] = []
    for kind, stage in [("step", s) for s in recipe.steps] + [("row", r) for r in recipe.rows]:
        needs = stage.get("needs", [])
        if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
            raise ConfigError(f"Recipe {path}: {kind} {stage['name']!r} `needs` must be a list of step names, e.g. needs: [refs].")
        bad = [n for n in needs if n not in earlier]
        if bad:
            raise ConfigError(f"Recipe {path}: {kind} {stage['name']!r} needs {bad}, which are not steps listed before it; "
                              f"name earlier steps ({', '.join(earlier) or 'none'}).")
        for key in ("inputs", "outputs"):
            value = stage.get(key, [])
            if kind == "row" and key in stage:
                raise ConfigError(f"Recipe {path}: row {stage['name']!r} takes no `{key}` (a row's input is its `model`); remove it.")
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"Recipe {path}: step {stage['name']!r} `{key}` must be a list of paths, e.g. {key}: [refs/aligned].")
        if kind == "step":
            earlier.append(stage["name"])


def _flags(settings: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


@dataclass
class _Stage:
    """One step or row of a recipe run: its command, log and the steps it waits for."""

    kind: str
    name: str
    command: Callable[[], list[str]]  # built when the stage starts: a row's {json:} refs need its steps' outputs
    log: Path
    needs: list[str]
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    cpu_s: float = 0.0  # user + system seconds of the stage's process and the children it waited for

    def start(self) -> None:
        self.argv = self.command()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as f:
            f.write(f"\n$ {shlex.join(self.argv)}\n")
            f.flush()
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "TQDM_MININTERVAL": "5"})

    def reap(self) -> bool:
        """True once the process has ended (exit code in proc.returncode, CPU seconds in cpu_s)."""
        assert self.proc is not None
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return True

    def failure(self, rc: int) -> str:
        tail = self.log.read_text().strip().splitlines()[-1:] or [""]
        return f"{shlex.join(_typed(self.argv))} failed (exit {rc}): {tail[0][:300]} — see {self.log}; fix it and rerun, finished stages are kept."


@dataclass
class _Timings:
    """Seconds per stage, rewritten after each: OUT/timings.json (wall) and OUT/cpu_timings.json (CPU)."""

    out: Path
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, out: Path) -> _Timings:
        read = [json.loads(p.read_text()) if p.is_file() else {} for p in (out / "timings.json", out / "cpu_timings.json")]
        return cls(out, *read)

    def record(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name], self.cpu[name] = round(wall, 1), round(cpu, 1)
        write_json(self.out / "timings.json", self.wall)
        write_json(self.out / "cpu_timings.json", self.cpu)


def _schedule(stages: list[_Stage], done: set[str], jobs: int, timings: _Timings, echo: Any, total: int,
              position: dict[str, int], finished: Callable[[_Stage], None] = lambda st: None) -> None:
    """Run `stages` (in list order when jobs = 1), at most `jobs` at a time, each once its needs are done."""
    pending: list[_Stage] = list(stages)
    running: list[_Stage] = []
    failed: list[str] = []
    main_thread = threading.current_thread() is threading.main_thread()
    # `kill` (SIGTERM) ends the run like Ctrl-C does: through the cleanup below
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        _loop(pending, running, failed, done, jobs, timings, echo, total, position, finished)
    finally:  # Ctrl-C, kill or an error here: no orphaned training process keeps the cores
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        for st in running:
            if st.proc is not None and st.proc.poll() is None:
                st.proc.terminate()
                st.proc.wait()
    if failed:
        raise DataError(failed[0])


def _terminated(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _loop(pending: list[_Stage], running: list[_Stage], failed: list[str], done: set[str], jobs: int,
          timings: _Timings, echo: Any, total: int, position: dict[str, int], finished: Callable[[_Stage], None]) -> None:
    while pending or running:
        while not failed and len(running) < jobs:
            ready = next((st for st in pending if all(n in done for n in st.needs)), None)
            if ready is None:
                break
            pending.remove(ready)
            echo(f"[reproduce] {position[ready.name]}/{total} {ready.kind} {ready.name}: running (log: {ready.log})")
            ready.start()
            running.append(ready)
        if not running:
            if failed or not pending:
                break
            raise DataError(f"Stages {[st.name for st in pending]} wait for steps that did not run; check their `needs`.")
        time.sleep(0.2)
        for st in [st for st in running if st.reap()]:
            running.remove(st)
            assert st.proc is not None
            if st.proc.returncode != 0:
                failed.append(st.failure(st.proc.returncode))
                continue
            wall = time.perf_counter() - st.started
            timings.record(st.name, wall, st.cpu_s)
            finished(st)
            done.add(st.name)
            echo(f"[reproduce] {position[st.name]}/{total} {st.kind} {st.name}: done in {wall:.0f} s ({st.cpu_s:.0f} CPU s)")
        if failed and not running:
            break


def _step_argv(step: dict[str, Any]) -> list[str]:
    if "run" in step:
        return [*_LATENTGUARD, *shlex.split(str(step["run"]))]
    return [sys.executable, *shlex.split(str(step["python"]))]


_JSON_REF = re.compile(r"\{json:([^#}]+)#([^}]+)\}")


def resolve_refs(value: str, dry_run: bool = False) -> str:
    """Replace `{json:PATH#KEY}` with PATH's top-level KEY, e.g. the alpha a `lock tune` step chose."""

    def one(m: re.Match[str]) -> str:
        path, key = Path(m.group(1)), m.group(2)
        if dry_run and not path.is_file():
            return m.group(0)
        if not path.is_file():
            raise DataError(f"{path} (named by {m.group(0)}) does not exist; the step that writes it must run first.")
        doc = json.loads(path.read_text())
        if key not in doc:
            raise DataError(f"{path} has no key {key!r} (named by {m.group(0)}); fix the recipe.")
        return str(doc[key])

    return _JSON_REF.sub(one, value)


def _row_argv(recipe: Recipe, row: dict[str, Any], out: Path, dry_run: bool = False) -> list[str]:
    settings = {**recipe.eval, **(row.get("eval") or {}), "model": resolve_refs(str(row["model"]), dry_run), "out": str(out)}
    if row.get("defense"):
        defs = row["defense"] if isinstance(row["defense"], list) else [row["defense"]]
        settings["defense"] = [resolve_refs(d, dry_run) for d in defs]
    return [*_LATENTGUARD, "eval", *_flags(settings)]


def summarize_row(run_dir: Path) -> dict[str, Any]:
    """Harmful rate per harmful set, over-refusal (keyword judge first; eval.matrix.pick_rate) and utility of one eval run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    row: dict[str, Any] = {"harmful": {}, "overrefusal": {}, "nll": {}, "judges": summary["run"].get("judges")}
    for name, entry in summary["datasets"].items():
        if entry["role"] == "utility":
            row["nll"][name] = entry["utility"]["nll_per_token"]["value"]
            continue
        rate, judge = pick_rate(entry)
        if rate is not None and entry["role"] in ("harmful", "overrefusal"):
            row[entry["role"]][name] = {"value": rate["value"], "ci95": rate.get("ci95"), "n": entry["n"], "judge": judge}
    if "matrix" in summary:  # an `--attack` x `--defense` run: keep its harmful-rate grid for the table
        m = summary["matrix"]
        row["matrix"] = {"attacks": [a["label"] for a in m["attacks"]], "defenses": [d["label"] for d in m["defenses"]],
                         "harmful_rate": {a: {d: (c or {}).get("value") for d, c in by_d.items()}
                                          for a, by_d in m["harmful_rate"].items()},
                         "overrefusal": {d: (c or {}).get("value") for d, c in m.get("overrefusal", {}).items()}}
    row["harmful_mean"] = _mean([v["value"] for v in row["harmful"].values()])
    row["overrefusal_mean"] = _mean([v["value"] for v in row["overrefusal"].values()])
    row["nll_mean"] = _mean(list(row["nll"].values()))
    return row


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}"


def _cell(entry: dict[str, Any] | None) -> str:
    """`41 [25–59]`: the rate and its 95 % bootstrap interval, in percent."""
    if not entry or entry.get("value") is None:
        return "—"
    ci = entry.get("ci95") or []
    return _pct(entry["value"]) + (f" [{_pct(ci[0])}–{_pct(ci[1])}]" if len(ci) == 2 and None not in ci else "")


def _table(rows: list[dict[str, Any]]) -> str:
    rows = [r for r in rows if not r.get("matrix")]  # attack x defence rows get their own tables
    harm_sets = list(dict.fromkeys(s for r in rows for s in r["harmful"]))
    over_sets = list(dict.fromkeys(s for r in rows for s in r["overrefusal"]))
    util_sets = list(dict.fromkeys(s for r in rows for s in r["nll"]))
    head = ["row", "model", "defence", *[f"harmful % {s}" for s in harm_sets], *[f"over-refusal % {s}" for s in over_sets],
            *[f"{s} answer NLL" for s in util_sets]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"`{r['model']}`", " + ".join(f"`{d}`" for d in r["defense"]) or "none"]
        cells += [_cell(r["harmful"].get(s)) for s in harm_sets]
        cells += [_cell(r["overrefusal"].get(s)) for s in over_sets]
        cells += ["—" if r["nll"].get(s) is None else f"{r['nll'][s]:.3f}" for s in util_sets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _matrix_tables(rows: list[dict[str, Any]]) -> str:
    """One attack x defence table (harmful %) per matrix row, with the defences' over-refusal as the last line."""
    parts = []
    for r in rows:
        m = r.get("matrix")
        if not m:
            continue
        head = ["attack \\ defence", *m["defenses"]]
        lines = [f"\nAttack x defence, row `{r['name']}` (model `{r['model']}`): harmful %", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in m["attacks"]:
            lines.append("| " + " | ".join([a, *(_pct(m["harmful_rate"].get(a, {}).get(d)) for d in m["defenses"])]) + " |")
        if m["overrefusal"]:
            lines.append("| " + " | ".join(["*over-refusal*", *(_pct(m["overrefusal"].get(d)) for d in m["defenses"])]) + " |")
        parts.append("\n".join(lines) + "\n")
    if parts:
        parts.append("\n'—': no judgeable response in that cell (every response empty).\n")
    return "".join(parts)


_MODEL_FILES = (".safetensors", ".bin", ".gguf", ".json")


class _Fingerprints:
    """Current fingerprints of model specs, cached in OUT/fingerprints.json by the size and mtime of their files.

    `get` returns None when it cannot tell (no such local model, a hub id, a model that fails to load):
    an unknown fingerprint never makes a stage stale.
    """

    def __init__(self, out: Path, write: bool = True) -> None:
        self.path, self.write = out / "fingerprints.json", write
        self.cache: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.failed: dict[str, str] = {}

    @staticmethod
    def _key(spec: str) -> list[Any] | None:
        from latentguard.models.loading import EMBEDDED, embedded_gguf

        path = embedded_gguf() if spec == EMBEDDED else Path(spec).expanduser()
        files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.suffix in _MODEL_FILES) if path.is_dir() else []
        key: list[Any] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        adapter = path / "adapter_config.json"
        if key and adapter.is_file() and not (path / "config.json").is_file():  # a LoRA adapter: its base counts too
            base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
            if base and base != spec:
                key.append(["base", base, _Fingerprints._key(base)])
        return key or None

    def get(self, spec: str) -> str | None:
        """The model's fingerprint now; None when it cannot be told (see the class)."""
        key = self._key(spec)
        if key is None:
            return None
        hit = self.cache.get(spec)
        if hit and hit["key"] == key:
            return str(hit["fingerprint"])
        from latentguard.errors import LatentGuardError
        from latentguard.models import load_model

        try:
            loaded = load_model(spec)
        except (LatentGuardError, OSError, ValueError) as e:  # e.g. a run folder without config.json
            self.failed[spec] = str(e).splitlines()[0] if str(e) else type(e).__name__
            return None
        fp = loaded.info.fingerprint
        del loaded
        self.cache[spec] = {"key": key, "fingerprint": fp}
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.cache)
        return fp


def step_inputs(step: dict[str, Any]) -> list[str]:
    """The models a step is built from: its `inputs:`, else the `--model` of a `run:` step."""
    if "inputs" in step:
        return list(step["inputs"])
    model = _flag_value(step, "--model") if "run" in step else None
    return [model] if model else []


def step_outputs(step: dict[str, Any]) -> list[str]:
    """What a step writes (moved aside by --rerun-stale): its `outputs:`, else its `--out`."""
    if "outputs" in step:
        return list(step["outputs"])
    out = _flag_value(step, "--out")
    return [out] if out else []


def _flag_value(step: dict[str, Any], flag: str) -> str | None:
    argv = shlex.split(str(step.get("run") or step.get("python") or ""))
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _artefacts_used(summary: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(kind, path, fingerprint) of every artefact an eval run applied, defences and attacks alike:
    kind "artefact" (fingerprint of the model it was built for) or "model" (a fine-tune's own fingerprint)."""
    found: set[tuple[str, str, str]] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if x.get("artefact") and x.get("artefact_fingerprint"):
                found.add(("artefact", str(x["artefact"]), str(x["artefact_fingerprint"])))
            if x.get("artefact") and x.get("finetune_fingerprint"):
                found.add(("model", str(x["artefact"]), str(x["finetune_fingerprint"])))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk([summary.get("run"), summary.get("matrix")])
    return found


def _artefact_model(path: str) -> str | None:
    """Fingerprint of the model the artefact at `path` was built for (its meta.json; a MoGU run folder
    keeps the router artefact in mogu/, as `load_mogu` reads it), or None."""
    folder = Path(path).expanduser()
    meta = folder / "meta.json"
    if not (folder / "tensors.safetensors").is_file() and (folder / "mogu" / "meta.json").is_file():
        meta = folder / "mogu" / "meta.json"
    if not meta.is_file():
        return None
    model = json.loads(meta.read_text()).get("model")
    return str(model["fingerprint"]) if isinstance(model, dict) and model.get("fingerprint") else None


def find_stale(recipe: Recipe, steps: list[dict[str, Any]], rows: list[dict[str, Any]], done: set[str],
               fingerprints: _Fingerprints) -> dict[str, str]:
    """Finished steps and rows whose inputs changed since they ran: {name: why}. `done`: the finished ones.

    Unknown fingerprints (a model that is gone or does not load) never make a stage stale.
    """
    needs, stale = stage_needs(recipe), {}
    stamps = _read_stamps(recipe.out)
    rerun = {s["name"] for s in steps if s["name"] not in done and s.get("creates")}  # will run (again)

    def need_changed(name: str) -> str | None:
        for n in needs[name]:
            if n in rerun or n in stale:
                return f"needs step {n}, which {'is stale' if n in stale else 'runs again'}"
            was = stamps.get(name, {}).get("needs", {}).get(n)
            now = stamps.get(n, {}).get("finished_utc")
            if was and now and was != now:  # rebuilt since (also by a run that did not include this stage)
                return f"needs step {n}, which ran again at {now} (this stage used the run of {was})"
        return None

    def command_changed(name: str, argv: list[str]) -> str | None:
        was, now = stamps.get(name, {}).get("command"), _command(argv, recipe.out)
        return None if was is None or was == now else f"its command changed: was `{was}`, now `{now}`"

    def changed(spec: str, fp: str, what: str) -> str | None:
        now = fingerprints.get(spec)
        return None if now is None or now == fp else f"{what} {spec} {fp}, which is now {now}"

    for step in (s for s in steps if s["name"] in done):
        name = step["name"]
        why = need_changed(name) or command_changed(name, _step_argv(step))
        recorded = stamps.get(name, {}).get("inputs")
        if recorded is None and len(step_inputs(step)) == 1:  # finished before stamps: an artefact's meta names its model
            fp = _artefact_model(str(Path(step["creates"]).parent))
            recorded = {step_inputs(step)[0]: fp} if fp else {}
        for spec in step_inputs(step):  # the recipe's inputs now; one added since has no record to compare
            if not why and (recorded or {}).get(spec):
                why = changed(spec, recorded[spec], "built from")
        if why:
            stale[name] = why
    for row in (r for r in rows if r["name"] in done):
        name = row["name"]
        why = need_changed(name) or command_changed(name, _row_argv(recipe, row, recipe.out / "eval" / name, dry_run=True))
        if not why:
            summary = json.loads((recipe.out / "eval" / name / "summary.json").read_text())
            why = changed(resolve_refs(str(row["model"]), dry_run=True), str(summary["run"]["model"]["fingerprint"]),
                          "evaluated on")
            for kind, art, fp in sorted(_artefacts_used(summary)):
                if why:
                    break
                if kind == "model":
                    why = changed(art, fp, "attacked with the fine-tune")
                    continue
                now = _artefact_model(art)
                if now is not None and now != fp:
                    why = f"used artefact {art} built for {fp}, which is now built for {now}"
        if why:
            stale[name] = why
    return stale


def _read_stamps(out: Path) -> dict[str, Any]:
    path = out / "stamps.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _typed(argv: list[str]) -> list[str]:
    """A stage's argv as a person types it: `latentguard …` or `python script …`, not this interpreter's path."""
    if argv[:len(_LATENTGUARD)] == _LATENTGUARD:
        return ["latentguard", *argv[len(_LATENTGUARD):]]
    return ["python", *argv[1:]]


def _command(argv: list[str], out: Path) -> str:
    """A stage's command as a stamp compares it: without the interpreter (it differs between checkouts)
    and with the output folder as `{out}` (the same folder given relative or absolute)."""
    cmd = shlex.join(_typed(argv)[1:])
    for form in {str(out.resolve()), str(out)}:
        cmd = cmd.replace(form, "{out}")
    return cmd


def _stamp(out: Path, st: _Stage, step: dict[str, Any] | None, fingerprints: _Fingerprints, echo: Any,
           tracked: set[str]) -> None:
    """Record a finished stage: its command, the runs of the steps it needs (those with `creates:`; one
    without runs every time and is not tracked), a step's inputs' fingerprints."""
    stamps = _read_stamps(out)
    inputs = {spec: fingerprints.get(spec) for spec in step_inputs(step)} if step else {}
    for spec in [s for s, fp in inputs.items() if fp is None and s in fingerprints.failed]:
        echo(f"[reproduce] {st.name}: could not fingerprint input {spec} ({fingerprints.failed[spec]}); not checked on reruns")
    stamps[st.name] = {"command": _command(st.argv, out), "inputs": inputs,
                       "needs": {n: stamps[n]["finished_utc"] for n in st.needs if n in stamps and n in tracked},
                       "finished_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")}
    write_json(out / "stamps.json", stamps)


def _move_stale(recipe: Recipe, steps: list[dict[str, Any]], stale: dict[str, str], echo: Any) -> None:
    """Move the outputs of stale stages to OUT/stale/TIME/ (all checked first: nothing moves if one can't be)."""
    by_name, cwd, out = {s["name"]: s for s in steps}, Path.cwd().resolve(), recipe.out.resolve()
    moves: list[Path] = []
    for name in stale:
        if name in by_name:
            outs = step_outputs(by_name[name])
            if not outs:
                raise ConfigError(f"Step {name!r} is stale but the recipe names no outputs for it; "
                                  "add `outputs: [PATH]` to the step (or delete what it wrote) and rerun.")
            for o in outs:
                full = Path(o).expanduser().resolve()
                if full in (cwd, out) or full in cwd.parents or full in out.parents:
                    raise ConfigError(f"Step {name!r} names {o} as an output, which holds the whole run; "
                                      "name the step's own folder in `outputs:`.")
                moves.append(full)
        else:
            moves.append((recipe.out / "eval" / name).resolve())
    moves = sorted({m for m in moves if m.exists()})
    moves = [m for m in moves if not any(o != m and m.is_relative_to(o) for o in moves)]  # nested: the outer one moves
    root = recipe.out / "stale"
    dest = root / _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    for i in range(1, 1000):  # two reruns within a second get their own folders
        if not dest.exists():
            break
        dest = dest.with_name(f"{dest.name.split('-')[0]}-{i}")
    dest.mkdir(parents=True)
    (root / ".gitignore").write_text("# outputs of stale stages, moved by --rerun-stale\n*\n")
    for src in moves:
        base = next((b for b in (out, cwd) if src.is_relative_to(b)), Path(src.anchor))
        target = dest / src.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(target))
        echo(f"[reproduce] moved {src} to {target}")


def stage_needs(recipe: Recipe) -> dict[str, list[str]]:
    """Each step's and row's `needs`, defaults filled in: every earlier step for a step, every step for a row."""
    names = [s["name"] for s in recipe.steps]
    needs = {s["name"]: list(s.get("needs", names[:i])) for i, s in enumerate(recipe.steps)}
    return needs | {r["name"]: list(r.get("needs", names)) for r in recipe.rows}


def projected_wall_s(recipe: Recipe, timings: dict[str, float], jobs: int) -> tuple[float, list[str]]:
    """Wall time of a from-scratch run with `jobs` slots, scheduled as `run_recipe` does, from per-stage seconds.

    Returns (seconds, stages with no recorded time, counted as 0).
    """
    stages = list(stage_needs(recipe).items())
    pending, done, now = list(stages), set(), 0.0
    running: list[tuple[float, str]] = []
    while pending or running:
        while len(running) < jobs:
            ready = next((st for st in pending if all(n in done for n in st[1])), None)
            if ready is None:
                break
            pending.remove(ready)
            running.append((now + float(timings.get(ready[0], 0.0)), ready[0]))
        running.sort()
        now, name = running.pop(0)
        done.add(name)
    return now, [n for n, _ in stages if n not in timings]


def plan(recipe: Recipe, only: list[str] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[str]]:
    """(steps to consider, rows to evaluate, names of the finished ones): `only` keeps those rows and the steps
    they need, directly or through other steps; a step is finished when its `creates` exists, a row when its
    eval summary does."""
    needs = stage_needs(recipe)
    rows = [r for r in recipe.rows if not only or r["name"] in only]
    if only and len(rows) != len(set(only)):
        missing = sorted(set(only) - {r["name"] for r in rows})
        raise ConfigError(f"--only names rows the recipe lacks: {', '.join(missing)}; use names from its `rows:`.")
    wanted = {s["name"] for s in recipe.steps}
    if only:
        wanted, todo = set(), [n for r in rows for n in needs[r["name"]]]
        while todo:
            n = todo.pop()
            if n not in wanted:
                wanted.add(n)
                todo += needs[n]
    steps = [s for s in recipe.steps if s["name"] in wanted]
    done = {s["name"] for s in steps if s.get("creates") and Path(s["creates"]).exists()}
    done |= {r["name"] for r in rows if (recipe.out / "eval" / r["name"] / "summary.json").is_file()}
    return steps, rows, done


def run_recipe(recipe: Recipe, only: list[str] | None = None, echo: Any = print, jobs: int = 1,
               rerun_stale: bool = False) -> Path:
    """Run the recipe's steps and rows (resuming; `jobs` at a time), then write results.json, results.md and report.html.

    Finished stages whose inputs changed stop the run (DataError naming them) unless `rerun_stale`.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs}); pass --jobs 1 to run one stage at a time.")
    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    timings = _Timings.load(out)
    total = len(recipe.steps) + len(recipe.rows)
    position = {st["name"]: i for i, st in enumerate([*recipe.steps, *recipe.rows], 1)}
    needs = stage_needs(recipe)
    steps, rows, done = plan(recipe, only)
    fingerprints = _Fingerprints(out)
    stale = find_stale(recipe, steps, rows, done, fingerprints)
    if stale and not rerun_stale:
        raise DataError(f"{len(stale)} finished stage(s) are stale: " + "; ".join(f"{n} ({why})" for n, why in stale.items())
                        + f". Pass --rerun-stale to move their outputs to {out / 'stale'}/ and run them again.")
    if stale:
        _move_stale(recipe, steps, stale, echo)
        done -= set(stale)
    stages = []
    for step in steps:
        if step["name"] in done:
            echo(f"[reproduce] {position[step['name']]}/{total} step {step['name']}: done, skipped")
            continue
        stages.append(_Stage("step", step["name"], functools.partial(_step_argv, step), out / "logs" / f"{step['name']}.log",
                             needs[step["name"]]))
    for row in rows:
        if row["name"] in done:
            echo(f"[reproduce] {position[row['name']]}/{total} row {row['name']}: done, skipped")
            continue
        stages.append(_Stage("row", row["name"], functools.partial(_row_argv, recipe, row, out / "eval" / row["name"]),
                             out / "logs" / f"{row['name']}.log", needs[row["name"]]))
    by_name = {s["name"]: s for s in steps}
    done &= set(by_name)  # the scheduler's `done`: finished steps

    def finished(st: _Stage) -> None:
        _stamp(out, st, by_name.get(st.name), fingerprints, echo, {n for n, s in by_name.items() if s.get("creates")})

    t0 = time.perf_counter()
    _schedule(stages, done, jobs, timings, echo, total, position, finished)
    this_run = {"jobs": jobs, "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(sum(st.cpu_s for st in stages), 1),
                "stages": [st.name for st in stages]}
    results = []
    for row in rows:
        run_dir = out / "eval" / row["name"]
        defense = row.get("defense") or []
        defense = [resolve_refs(d) for d in (defense if isinstance(defense, list) else [defense])]
        results.append({"name": row["name"], "group": row.get("group", ""), "model": resolve_refs(str(row["model"])),
                        "defense": defense, "run_dir": str(run_dir),
                        "wall_s": timings.wall.get(row["name"]), "cpu_s": timings.cpu.get(row["name"]),
                        **summarize_row(run_dir)})
    doc = {"kind": "reproduce_results", "recipe": recipe.name, "description": recipe.description, "eval": recipe.eval,
           "rows": results, "timings_s": timings.wall, "cpu_timings_s": timings.cpu, "last_run": this_run, "latentguard": __version__, "commit": git_commit(),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    write_json(out / "results.json", doc)
    (out / "results.md").write_text(_table(results) + _matrix_tables(results))
    write_eval_report([r["run_dir"] for r in results], out / "report.html")
    echo(f"[reproduce] wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'report.html'}")
    return out


@click.command("reproduce")
@click.option("--config", "config_path", required=True, help="recipe YAML (configs/reproduce/embedded.yaml, quick.yaml, ...)")
@click.option("--quick", is_flag=True, help="merge the recipe's `quick:` section over it (CI-scale smoke run)")
@click.option("--out", default=None, help="output folder (default: the recipe's `out`)")
@click.option("--only", default=None, help="comma list of row names to evaluate and tabulate (runs only the steps they need)")
@click.option("--jobs", default=1, show_default=True, type=int,
              help="stages run at once (each step/row waits for the steps in its `needs`); one per core")
@click.option("--rerun-stale", is_flag=True,
              help="finished stages whose models or artefacts changed: move their outputs to OUT/stale/ and run them again")
@click.option("--dry-run", is_flag=True, help="print the commands without running them")
def command(config_path: str, quick: bool, out: str | None, only: str | None, jobs: int, rerun_stale: bool,
            dry_run: bool) -> int:
    """Build the reference models and artefacts, evaluate every row, write results/ and the report."""
    recipe = load_recipe(config_path, quick=quick, out=out)
    if dry_run:
        all_needs = stage_needs(recipe)
        steps, rows, done = plan(recipe, [o for o in (only or "").split(",") if o] or None)
        stale = find_stale(recipe, steps, rows, done, _Fingerprints(recipe.out, write=False)) if done else {}

        def status(name: str) -> str:
            return f"stale: {stale[name]}" if name in stale else "done" if name in done else "runs"

        for s in steps:
            needs = ",".join(all_needs[s["name"]]) or "-"
            click.echo(f"step {s['name']} (needs {needs}) [{status(s['name'])}]: "
                       f"{shlex.join(_step_argv(s)[len(_LATENTGUARD) if 'run' in s else 1:])}")
        for r in rows:
            needs = ",".join(all_needs[r["name"]]) or "-"
            argv = _row_argv(recipe, r, recipe.out / "eval" / r["name"], dry_run=True)[len(_LATENTGUARD):]
            click.echo(f"row {r['name']} (needs {needs}) [{status(r['name'])}]: {shlex.join(argv)}")
        timings_path = recipe.out / "timings.json"
        if timings_path.is_file():
            wall, missing = projected_wall_s(recipe, json.loads(timings_path.read_text()), jobs)
            click.echo(f"projected wall time from scratch with --jobs {jobs}: {wall / 3600:.1f} h ({wall / 60:.0f} min), "
                       f"from the stage times in {timings_path}"
                       + (f"; no time recorded for {', '.join(missing)} (counted as 0)" if missing else ""))
        return 0
    run_recipe(recipe, [o for o in (only or "").split(",") if o] or None, echo=lambda m: click.echo(m, err=True), jobs=jobs,
               rerun_stale=rerun_stale)
    return 0
