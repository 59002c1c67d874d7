"""`latentguard reproduce`: recipe checks, steps and rows run as real processes, resume, results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from latentguard.cli.main import main
from latentguard.cli.reproduce import load_recipe, resolve_refs
from latentguard.errors import ConfigError, DataError

RECIPE = """
name: tiny
out: {out}
eval: {{datasets: "advbench-heldout,gsm8k-test", limit: 1, max_new_tokens: 2}}
steps:
  - name: note
    python: "{script} {out}/marker.json"
    creates: "{out}/marker.json"
rows:
  - {{name: plain, group: reference, model: embedded}}
quick:
  eval: {{max_new_tokens: 1}}
"""


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "step.py"
    script.write_text("import json, sys\njson.dump({'alpha': 1.5}, open(sys.argv[1], 'w'))\n")
    return script


def _rejects(recipe: Path, text: str, match: str) -> None:
    """`text` as a recipe fails to load with a one-line ConfigError matching `match`."""
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_recipe(recipe)


def test_recipe_runs_steps_and_rows_then_resumes(tmp_path, embedded):
    out = tmp_path / "res"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=out, script=_script(tmp_path)))
    assert main(["reproduce", "--config", str(recipe)]) == 0
    doc = json.loads((out / "results.json").read_text())
    row = doc["rows"][0]
    assert row["name"] == "plain" and set(row["harmful"]) == {"advbench-heldout"} and set(row["nll"]) == {"gsm8k-test"}
    assert 0.0 <= row["harmful"]["advbench-heldout"]["value"] <= 1.0 and row["nll"]["gsm8k-test"] > 0
    assert "| plain | `embedded` | none |" in (out / "results.md").read_text()
    assert (out / "report.html").stat().st_size > 1000
    assert resolve_refs("x={json:%s#alpha}" % (out / "marker.json")) == "x=1.5"
    # rerun: the step is skipped (its output exists) and the finished row is not evaluated again
    stamp = (out / "eval" / "plain" / "summary.json").stat().st_mtime_ns
    (out / "logs" / "note.log").unlink()
    assert main(["reproduce", "--config", str(recipe)]) == 0
    assert not (out / "logs" / "note.log").exists()
    assert (out / "eval" / "plain" / "summary.json").stat().st_mtime_ns == stamp


def test_quick_merges_and_bad_recipes_fail_clearly(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "o", script=_script(tmp_path)))
    assert load_recipe(recipe, quick=True).eval == {"datasets": "advbench-heldout,gsm8k-test", "limit": 1, "max_new_tokens": 1}
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    _rejects(recipe, "name: x\nrows: []\n", "has no rows")
    _rejects(recipe, "name: x\nrows: [{name: a}]\n", "has no `model`")
    _rejects(recipe, "name: x\nsteps: [{name: s, run: list, python: x.py}]\nrows: [{name: a, model: embedded}]\n", "exactly one of")
    with pytest.raises(ConfigError, match="no `quick:` section"):
        recipe.write_text("name: x\nrows: [{name: a, model: embedded}]\n")
        load_recipe(recipe, quick=True)
    with pytest.raises(DataError, match="must run first"):
        resolve_refs("{json:%s#a}" % (tmp_path / "nope.json"))


def test_failing_step_names_the_stage_and_its_log(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nout: {tmp_path / 'o'}\nsteps: [{{name: broken, run: train --method nosuch}}]\n"
                      "rows: [{name: a, model: embedded}]\n")
    assert main(["reproduce", "--config", str(recipe)]) == 2
    assert "nosuch" in (tmp_path / "o" / "logs" / "broken.log").read_text()
    assert not (tmp_path / "o" / "results.json").exists()


def test_shipped_recipes_load(tmp_path):
    root = Path(__file__).resolve().parents[2] / "configs" / "reproduce"
    for path in sorted(root.glob("*.yaml")):
        full, quick = load_recipe(path), load_recipe(path, quick=True)
        assert full.rows and quick.rows and quick.out != full.out


def test_env_references_take_the_variable_then_the_default(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nrows: [{name: a, model: '{env:LG_TEST_MODEL:-models/default}'}]\n")
    monkeypatch.delenv("LG_TEST_MODEL", raising=False)
    assert load_recipe(recipe).rows[0]["model"] == "models/default"
    monkeypatch.setenv("LG_TEST_MODEL", "/weights/here")
    assert load_recipe(recipe).rows[0]["model"] == "/weights/here"
    recipe.write_text("name: x\nrows: [{name: a, model: '{env:LG_TEST_UNSET}'}]\n")
    monkeypatch.delenv("LG_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"needs \$LG_TEST_UNSET.*set it"):
        load_recipe(recipe)


def test_shipped_quick_recipe_runs_end_to_end(tmp_path, embedded):
    """`make reproduce-quick` in CI: the shipped recipe's quick section, direction step, rows and the matrix row."""
    recipe = Path(__file__).resolve().parents[2] / "configs" / "reproduce" / "embedded.yaml"
    out = tmp_path / "quick"
    assert main(["reproduce", "--config", str(recipe), "--quick", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names == ["embedded", "embedded+add", "embedded+conditional", "attacks-embedded"]
    matrix = doc["rows"][-1]["matrix"]
    assert matrix["attacks"] == ["none", "prefix-injection", "ablate"] and matrix["defenses"] == ["none", "add(α=1.0)"]
    md = (out / "results.md").read_text()
    assert "| embedded+add | `embedded` |" in md and "Attack x defence, row `attacks-embedded`" in md
    assert "attacks-embedded |" not in md.split("Attack x defence")[0]  # matrix rows stay out of the main table


STAMP = "import json, sys, time\nt0 = time.time()\ntime.sleep(float(sys.argv[2]))\n" \
        "json.dump({'start': t0, 'end': time.time()}, open(sys.argv[1], 'w'))\nsys.exit(int(sys.argv[3]))\n"


def _parallel_recipe(tmp_path: Path, fail_b: bool = False) -> Path:
    """Steps a and b are independent; c needs a; the row needs nothing but b."""
    script = tmp_path / "stamp.py"
    script.write_text(STAMP)
    out = tmp_path / "o"
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"""
name: par
out: {out}
eval: {{datasets: "advbench-heldout", limit: 1, max_new_tokens: 2}}
steps:
  - {{name: a, python: "{script} {out}/a.json 2 0", creates: "{out}/a.json", needs: []}}
  - {{name: b, python: "{script} {out}/b.json 1 {int(fail_b)}", needs: []}}
  - {{name: c, python: "{script} {out}/c.json 0 0", creates: "{out}/c.json", needs: [a]}}
rows:
  - {{name: plain, model: embedded, needs: [b]}}
""")
    return recipe


def test_jobs_run_independent_stages_at_once_and_respect_needs(tmp_path, embedded):
    recipe = _parallel_recipe(tmp_path)
    assert main(["reproduce", "--config", str(recipe), "--jobs", "2"]) == 0
    t = {n: json.loads((tmp_path / "o" / f"{n}.json").read_text()) for n in "abc"}
    assert t["b"]["start"] < t["a"]["end"] and t["a"]["start"] < t["b"]["end"]  # a and b overlapped
    assert t["c"]["start"] >= t["a"]["end"]  # c waited for a
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["last_run"]["jobs"] == 2 and set(doc["last_run"]["stages"]) == {"a", "b", "c", "plain"}
    assert set(doc["timings_s"]) == set(doc["cpu_timings_s"]) == {"a", "b", "c", "plain"}
    cpu = doc["cpu_timings_s"]  # the stage's own process: a sleeping step uses next to no CPU, an eval row a lot
    assert cpu["a"] < 1.0 < cpu["plain"] and doc["rows"][0]["cpu_s"] == cpu["plain"]
    assert doc["last_run"]["cpu_s"] == pytest.approx(sum(cpu.values()), abs=0.3)


def test_jobs_failure_stops_new_stages_and_names_the_failed_one(tmp_path, capsys):
    recipe = _parallel_recipe(tmp_path, fail_b=True)
    assert main(["reproduce", "--config", str(recipe), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"python {tmp_path / 'stamp.py'}" in err and "b.log" in err and "exit 1" in err
    assert sys.executable not in err.split(" failed (exit")[0]  # the command as typed, not this checkout's interpreter
    out = tmp_path / "o"
    assert (out / "a.json").is_file()  # the stage running beside the failed one finished
    assert not (out / "eval" / "plain").exists() and not (out / "results.json").exists()  # b's dependant never started


def test_needs_must_name_earlier_steps(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nsteps: [{name: s, run: list, needs: [t]}, {name: t, run: list}]\n"
                      "rows: [{name: a, model: embedded}]\n")
    with pytest.raises(ConfigError, match=r"step 's' needs \['t'\], which are not steps listed before it"):
        load_recipe(recipe)
    _rejects(recipe, "name: x\nsteps: [{name: s, run: list}]\nrows: [{name: a, model: embedded, needs: s}]\n", "must be a list of step names")
    recipe.write_text("name: x\nrows: [{name: a, model: embedded}]\n")
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        from latentguard.cli.reproduce import run_recipe

        run_recipe(load_recipe(recipe, out=str(tmp_path / "o")), jobs=0)


def test_only_runs_just_the_steps_its_rows_need(tmp_path, embedded, capsys):
    recipe = _parallel_recipe(tmp_path)
    assert main(["reproduce", "--config", str(recipe), "--only", "nosuch"]) == 2
    assert "--only names rows the recipe lacks: nosuch" in capsys.readouterr().err
    assert main(["reproduce", "--config", str(recipe), "--only", "plain"]) == 0
    out = tmp_path / "o"
    assert (out / "b.json").is_file() and not (out / "a.json").exists() and not (out / "c.json").exists()
    assert [r["name"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["plain"]


def test_sigterm_to_the_run_ends_its_running_stages(tmp_path):
    """`kill RUN` must not leave a training process behind holding the cores."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "long.py"
    script.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nout: {tmp_path / 'o'}\nsteps: [{{name: long, python: '{script} {tmp_path / 'pid'}'}}]\n"
                      "rows: [{name: a, model: embedded}]\n")
    run = subprocess.Popen([sys.executable, "-m", "latentguard.cli.main", "reproduce", "--config", str(recipe)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pid_file = tmp_path / "pid"
    for _ in range(300):  # the step is running once it has written its pid
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # terminated and reaped by the run
        os.kill(child, 0)


STALE_RECIPE = """
name: stale
out: {out}
eval: {{datasets: "advbench-heldout", limit: 1, max_new_tokens: 1}}
steps:
  - name: derived                  # stands in for an artefact built from the model
    python: "{script} {out}/d/marker.json"
    inputs: ["{model}"]
    creates: "{out}/d/marker.json"
    outputs: ["{out}/d"]
rows:
  - {{name: plain, model: "{model}", needs: []}}
  - {{name: after, model: "{model}", needs: [derived]}}
"""


def test_a_changed_model_makes_its_finished_stages_stale(tmp_path, tiny_tokenizer, capsys):
    """Rebuilding a model outside the recipe must not leave rows or steps built on the old one in the table."""
    from latentguard.models import load_model
    from tests.conftest import build_tiny

    model = tmp_path / "m"

    def save(seed: int) -> str:
        build_tiny("llama", seed=seed).save_pretrained(model)
        tiny_tokenizer.save_pretrained(model)
        return load_model(str(model)).info.fingerprint

    fp0 = save(0)
    out = tmp_path / "o"
    recipe = tmp_path / "r.yaml"
    script = tmp_path / "mk.py"
    script.write_text("import pathlib, sys\np = pathlib.Path(sys.argv[1])\np.parent.mkdir(parents=True, exist_ok=True)\n"
                      "p.write_text('{}')\n")
    recipe.write_text(STALE_RECIPE.format(out=out, model=model, script=script))
    assert main(["reproduce", "--config", str(recipe)]) == 0
    assert json.loads((out / "stamps.json").read_text())["derived"]["inputs"] == {str(model): fp0}
    capsys.readouterr()
    assert main(["reproduce", "--config", str(recipe)]) == 0  # unchanged: everything reused
    assert "running" not in capsys.readouterr().err
    results = (out / "results.json").read_bytes()

    fp1 = save(1)  # e.g. `make refs` rebuilt the model
    assert fp1 != fp0
    assert main(["reproduce", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "3 finished stage(s) are stale" in err and "--rerun-stale" in err
    assert f"derived (built from {model} {fp0}, which is now {fp1})" in err
    assert f"plain (evaluated on {model} {fp0}, which is now {fp1})" in err
    assert "after (needs step derived, which is stale)" in err
    assert (out / "results.json").read_bytes() == results  # nothing rewritten
    assert main(["reproduce", "--config", str(recipe), "--dry-run"]) == 0
    assert "row plain (needs -) [stale: evaluated on" in capsys.readouterr().out

    assert main(["reproduce", "--config", str(recipe), "--rerun-stale"]) == 0
    moved = list((out / "stale").glob("*/"))
    assert len(moved) == 1 and (moved[0] / "eval/plain/summary.json").is_file()
    assert any(moved[0].rglob("d/marker.json"))
    for row in ("plain", "after"):
        summary = json.loads((out / "eval" / row / "summary.json").read_text())
        assert summary["run"]["model"]["fingerprint"] == fp1
    assert json.loads((out / "stamps.json").read_text())["derived"]["inputs"] == {str(model): fp1}
    assert main(["reproduce", "--config", str(recipe)]) == 0  # consistent again
    capsys.readouterr()

    # an edited recipe: the rows' eval command changed, the step's did not
    recipe.write_text(STALE_RECIPE.format(out=out, model=model, script=script).replace("max_new_tokens: 1", "max_new_tokens: 2"))
    assert main(["reproduce", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "2 finished stage(s) are stale: plain (its command changed: was `eval --datasets" in err
    assert "--max-new-tokens 1 " in err and "--max-new-tokens 2 " in err and "derived (" not in err

    # a step finished before stamps were kept: an artefact meta.json it created names the model it was built for
    (out / "stamps.json").unlink()
    (out / "d/marker.json").write_text(json.dumps({"model": {"fingerprint": fp0}}))
    (out / "d/meta.json").write_text(json.dumps({"model": {"fingerprint": fp0}}))
    recipe.write_text(STALE_RECIPE.format(out=out, model=model, script=script).replace("d/marker.json", "d/meta.json"))
    assert main(["reproduce", "--config", str(recipe), "--only", "plain"]) == 0  # the row needs no step
    assert main(["reproduce", "--config", str(recipe), "--dry-run"]) == 0
    assert f"step derived (needs -) [stale: built from {model} {fp0}, which is now {fp1}]" in capsys.readouterr().out


def test_the_artefacts_a_row_applied_are_found_in_defences_and_attacks(tmp_path):
    from latentguard.cli.reproduce import _artefact_model, _artefacts_used

    art, mogu = tmp_path / "dir", tmp_path / "mogu-run"
    art.mkdir()
    (art / "tensors.safetensors").write_bytes(b"")
    (art / "meta.json").write_text(json.dumps({"model": {"fingerprint": "bbb"}}))
    (mogu / "mogu").mkdir(parents=True)  # a MoGU run folder: the router artefact sits in mogu/, as load_mogu reads it
    (mogu / "meta.json").write_text(json.dumps({"model": {"fingerprint": "run"}}))
    (mogu / "mogu" / "meta.json").write_text(json.dumps({"model": {"fingerprint": "router"}}))
    summary = {"run": {"defenses": [{"defense": "add", "artefact": str(art), "artefact_fingerprint": "aaa"}]},
               "matrix": {"defenses": [{"describe": [{"artefact": "gone", "artefact_fingerprint": "ccc"}]}],
                          "attacks": [{"attack": "ablate", "artefact": "d2", "artefact_fingerprint": "ddd"},
                                      {"attack": "harmful-ft", "artefact": "refs/ft", "finetune_fingerprint": "eee"},
                                      {"attack": "radial", "artefact": "r"}]}}
    assert _artefacts_used(summary) == {("artefact", str(art), "aaa"), ("artefact", "gone", "ccc"),
                                        ("artefact", "d2", "ddd"), ("model", "refs/ft", "eee")}
    assert _artefact_model(str(art)) == "bbb" and _artefact_model("gone") is None
    assert _artefact_model(str(mogu)) == "router"


def test_a_step_rebuilt_by_a_run_that_left_a_row_out_makes_that_row_stale(tmp_path):
    """--only r2 reran step s; r1 (finished earlier on s's previous run) must not pass as fresh later."""
    from latentguard.cli.reproduce import _Fingerprints, find_stale, plan

    out = tmp_path / "o"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nout: {out}\nsteps: [{{name: s, run: list, creates: {tmp_path}/s.done}}]\n"
                      "rows: [{name: r1, model: no/such/model, needs: [s]}, {name: r2, model: no/such/model, needs: [s]}]\n")
    (tmp_path / "s.done").write_text("")
    for row in ("r1", "r2"):
        (out / "eval" / row).mkdir(parents=True)
        (out / "eval" / row / "summary.json").write_text(json.dumps({"run": {"model": {"fingerprint": "f"}}}))
    (out / "stamps.json").write_text(json.dumps({"s": {"finished_utc": "T2"}, "r1": {"needs": {"s": "T1"}},
                                                "r2": {"needs": {"s": "T2"}}}))
    rec = load_recipe(recipe)
    steps, rows, done = plan(rec)
    stale = find_stale(rec, steps, rows, done, _Fingerprints(out, write=False))
    assert stale == {"r1": "needs step s, which ran again at T2 (this stage used the run of T1)"}  # model unknown: not stale


def test_rerun_stale_refuses_an_output_that_holds_the_whole_run(tmp_path, monkeypatch):
    from latentguard.cli.reproduce import _move_stale

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nout: {tmp_path}/o\nsteps: [{{name: s, run: list, outputs: [.]}}]\nrows: [{{name: a, model: m}}]\n")
    rec = load_recipe(recipe)
    (tmp_path / "o/eval/a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds the whole run"):
        _move_stale(rec, rec.steps, {"s": "x", "a": "y"}, print)
    assert (tmp_path / "o/eval/a").is_dir()  # nothing moved
    rec.steps[0]["outputs"] = ["o/art", "o/art/inner"]  # nested: the outer folder moves, once
    (tmp_path / "o/art/inner").mkdir(parents=True)
    _move_stale(rec, rec.steps, {"s": "x", "a": "y"}, print)
    _move_stale(rec, rec.steps, {"a": "y"}, print)  # the same second: its own folder
    moved = sorted(p.name for p in (tmp_path / "o/stale").iterdir() if p.is_dir())
    assert len(moved) == 2 and (tmp_path / "o/stale" / moved[0] / "art/inner").is_dir()
    assert (tmp_path / "o/stale" / moved[0] / "eval/a").is_dir() and not (tmp_path / "o/art").exists()


def test_stale_steps_need_outputs_to_move_and_inputs_are_lists(tmp_path):
    from latentguard.cli.reproduce import step_inputs, step_outputs

    assert step_inputs({"run": "direction extract --model refs/aligned --out x"}) == ["refs/aligned"]
    assert step_inputs({"python": "s.py --model m", "inputs": ["a"]}) == ["a"]
    assert step_inputs({"python": "s.py --model m"}) == []  # a script's flags are its own
    assert step_outputs({"python": "s.py --out=o/x"}) == ["o/x"] and step_outputs({"run": "list"}) == []
    recipe = tmp_path / "r.yaml"
    _rejects(recipe, "name: x\nsteps: [{name: s, run: list, inputs: refs/aligned}]\nrows: [{name: a, model: embedded}]\n", "`inputs` must be a list of paths")
    _rejects(recipe, "name: x\nrows: [{name: a, model: embedded, inputs: [m]}]\n", "row 'a' takes no `inputs`")


def test_the_fingerprint_cache_key_of_an_adapter_covers_its_base(tmp_path):
    from latentguard.cli.reproduce import _Fingerprints

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"x")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"y")
    before = _Fingerprints._key(str(adapter))
    (base / "model.safetensors").write_bytes(b"rebuilt base")
    assert before and _Fingerprints._key(str(adapter)) != before  # a rebuilt base invalidates the cached fingerprint
    assert _Fingerprints._key(str(tmp_path / "nothing")) is None
