"""benchmarks/run_all.py: records mapped to goals honestly (no benchmark is run here)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _run_all():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # run_all imports benchmarks/_common.py
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _goal(ra, label: str):
    return next(g for g in ra.GOALS if g.label.startswith(label))


def test_goal_text_of_a_record_is_parsed() -> None:
    ra = _run_all()
    text = "procon_over_sft_steps_per_s >= 0.9; mllr_over_sft = 1.00 (control shows the noise)"
    assert ra._goal_from_text(text, "procon_over_sft_steps_per_s") == (">=", 0.9)
    assert ra._goal_from_text(text, "mllr_over_sft") == ("~1", 1.0)
    assert ra._goal_from_text("steered_*_over_plain >= 0.97", "steered_add_over_plain") == (">=", 0.97)
    assert ra._goal_from_text("", "x_over_y") is None


def test_rows_judge_on_cpu_time_and_never_fill_in_missing_values() -> None:
    ra = _run_all()
    steer = {"steered_add_over_plain": 0.93, "plain_control_over_plain": 0.95,
             "cpu_time": {"steered_add_over_plain": 0.99, "plain_control_over_plain": 1.0}}
    (row,) = ra._rows(_goal(ra, "steered ÷ plain generate: `add`"), steer, "ran", use_cpu=True)
    assert (row["value"], row["cpu"], row["judged_on"], row["status"]) == (0.93, 0.99, "cpu", "ok")
    (row,) = ra._rows(_goal(ra, "steered ÷ plain generate: `add`"), steer, "ran", use_cpu=False)
    assert row["status"] == "MISSED"  # wall time on a GPU run
    (row,) = ra._rows(_goal(ra, "ProCon"), {"latentguard_over_bare_steps_per_s": 1.0}, "ran", use_cpu=True)
    assert (row["value"], row["status"]) == (None, "not in output")
    (row,) = ra._rows(_goal(ra, "eval harness"), None, "failed (exit 1)", use_cpu=True)
    assert (row["value"], row["status"]) == (None, "failed (exit 1)")


def test_one_row_per_matching_key_with_the_scripts_own_goal() -> None:
    ra = _run_all()
    mogu = {"v1_first_k_over_plain": 0.6, "v2_all_tokens_over_plain": 1.0, "plain_control_over_plain": 0.99,
            "cpu_time": {"v1_first_k_over_plain": 0.62, "v2_all_tokens_over_plain": 1.01}, "goal": "v1_* >= 0.5"}
    rows = ra._rows(_goal(ra, "MoGU"), mogu, "ran", use_cpu=True)
    assert [(r["key"], r["cpu"], r["status"]) for r in rows] == [
        ("v1_first_k_over_plain", 0.62, "ok"), ("v2_all_tokens_over_plain", 1.01, "—")]


def test_collect_mode_reads_records_and_marks_the_rest(tmp_path: Path) -> None:
    record = {"benchmark": "bench_taps", "date_utc": "2026-01-02T03:04:05+00:00", "command": "python benchmarks/bench_taps.py",
              "capture_over_plain": 1.2, "control_plain_over_plain": 1.0, "goal": "capture_over_plain <= 1.15"}
    (tmp_path / "bench_taps.json").write_text(json.dumps(record))
    out = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--collect", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "LATENTGUARD_BENCH_RESULTS": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["mode"] == "collect" and summary["machine"]["cpu_count"] >= 1 and "--collect" in summary["command"]
    rows = {r["label"]: r for r in summary["rows"]}
    capture = rows["capture ÷ plain forward (all-layer last-token capture)"]
    assert (capture["value"], capture["status"]) == (1.2, "MISSED")
    assert summary["scripts"]["bench_taps"]["result_date"] == record["date_utc"]
    assert rows["eval harness ÷ raw generate"]["status"] == "no record"
    assert summary["scripts"]["bench_attack"]["status"].startswith(("missing", "no record"))
    assert "| capture ÷ plain forward" in summary["table_markdown"]


def test_the_gpu_command_runs_every_benchmark_the_gpu_path_names() -> None:
    """`run_all.py --device cuda --model-config llama3-8b` (issue 12's GPU path): steered ÷ plain, ProCon ÷ SFT,
    capture ÷ forward and the eval harness must each get the device and shape, not be skipped."""
    import argparse

    ra = _run_all()
    args = argparse.Namespace(quick=True, device="cuda", model_config="llama3-8b")
    for name in ("steer", "train", "taps", "eval"):
        extra = ra._script_args(name, (ROOT / "benchmarks" / f"bench_{name}.py").read_text(), args)
        assert extra is not None and extra[-4:] == ["--device", "cuda", "--model-config", "llama3-8b"], name


def test_a_gpu_run_judges_steering_on_the_issues_stricter_goal() -> None:
    ra = _run_all()
    g = _goal(ra, "steered ÷ plain generate: `add`")
    rec = {"steered_add_over_plain": 0.975, "plain_control_over_plain": 1.0}
    assert ra._rows(g.on(False), rec, "ok", use_cpu=False)[0]["status"] == "ok"  # CPU goal >= 0.97
    gpu_row = ra._rows(g.on(True), rec, "ok", use_cpu=False)[0]
    assert gpu_row["status"] == "MISSED" and "0.98" in gpu_row["goal"]  # GPU path: >= 0.98 at batch 32
