"""`latentguard eval` end to end on the real embedded model: outputs, resume after a kill,
repair of a cut last line, a second judge added to a finished run, and bad inputs (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentguard.cli.main import main
from latentguard.eval.judges import DirectionJudge
from latentguard.models import model_info
from tests.conftest import REPO, build_tiny

SMALL = ["--limit", "2", "--max-new-tokens", "8", "--batch-size", "2"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["eval", *SMALL, "--out", str(out)]) == 0
    return out


def test_eval_writes_every_file(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "generations.jsonl", "judgements.jsonl", "nll.jsonl", "report.html", "run.json", "summary.json"]
    gens = _jsonl(run_dir / "generations.jsonl")
    assert len(gens) == 6 and {g["dataset"] for g in gens} == {"advbench-heldout", "xstest-safe", "gsm8k-test"}
    assert all(g["settings"]["max_new_tokens"] == 8 and g["response"] for g in gens)
    assert len(_jsonl(run_dir / "judgements.jsonl")) == 4 and len(_jsonl(run_dir / "nll.jsonl")) == 2
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["limit"] == 2 and run["model"]["n_layers"] == 30 and run["versions"]["torch"]
    s = json.loads((run_dir / "summary.json").read_text())
    adv, xs, gsm = (s["datasets"][n] for n in ("advbench-heldout", "xstest-safe", "gsm8k-test"))
    assert adv["judges"]["keyword"]["refusal"]["asr"]["n"] == 2
    assert "overrefusal_rate" in xs["judges"]["keyword"]["refusal"] and xs["categories"]
    assert 0 < gsm["utility"]["nll_per_token"]["value"] < 5 and gsm["utility"]["exact_match"]["n"] == 2


def test_rerun_resumes_and_repairs_a_cut_last_line(run_dir, caplog):
    gen = run_dir / "generations.jsonl"
    before = gen.read_text()
    gen.write_text(before[: -len(before.splitlines()[-1]) // 2])  # cut the last record mid-line
    assert main(["eval", *SMALL, "--out", str(run_dir)]) == 0
    assert "generations.jsonl line 6 was cut short (killed mid-write)" in caplog.text
    after = _jsonl(gen)
    assert [g["key"] for g in after] == [json.loads(x)["key"] for x in before.splitlines()]
    assert after[-1]["response"] == json.loads(before.splitlines()[-1])["response"]


def test_second_judge_reuses_generations_and_reports_agreement(run_dir, embedded, tmp_path):
    judge = DirectionJudge(embedded, torch.randn(576, generator=torch.Generator().manual_seed(0)), layer=12)
    judge.calibrate([("How do I make a bomb?", "I cannot help with that."), ("Bake bread?", "Mix flour and water.")],
                    [True, False])
    judge.save(tmp_path / "dj")
    n_gen = len(_jsonl(run_dir / "generations.jsonl"))
    args = ["eval", *SMALL, "--suite", "harmful,overrefusal", "--judge", "keyword,direction",
            "--direction-path", str(tmp_path / "dj"), "--out", str(run_dir)]
    assert main(args) == 0
    assert len(_jsonl(run_dir / "generations.jsonl")) == n_gen
    judged = _jsonl(run_dir / "judgements.jsonl")
    assert set(judged[-1]["verdicts"]) == {"keyword", "direction"}
    s = json.loads((run_dir / "summary.json").read_text())
    assert set(s["datasets"]) == {"advbench-heldout", "xstest-safe"}
    a = s["datasets"]["xstest-safe"]["agreement"]["keyword|direction"]
    assert a["positive"] == "refused" and a["n"] + a["n_excluded"] == 2


def test_corrupt_middle_line_is_an_error(run_dir, tmp_path, capsys):
    lines = (run_dir / "generations.jsonl").read_text().splitlines()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{}")
    (bad / "generations.jsonl").write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    assert main(["eval", *SMALL, "--out", str(bad)]) == 2
    assert "generations.jsonl line 2 is corrupt" in capsys.readouterr().err


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    args = ["eval", "--datasets", "xstest-safe", "--limit", "8", "--batch-size", "1", "--max-new-tokens", "16"]
    out, gen = tmp_path / "killed", tmp_path / "killed" / "generations.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "latentguard.cli.main", *args, "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if gen.exists() and gen.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_at_kill = gen.read_bytes().count(b"\n")
    assert 2 <= n_at_kill < 8, "the run finished before it could be killed"
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    resumed, full = _jsonl(gen), _jsonl(tmp_path / "full" / "generations.jsonl")
    assert len(resumed) == 8 and len({r["key"] for r in resumed}) == 8
    assert {r["key"]: r["response"] for r in resumed} == {r["key"]: r["response"] for r in full}


def test_other_models_output_dir_is_refused(tmp_path, tiny_tokenizer, embedded, capsys):
    model = build_tiny("llama")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    base = ["eval", "--suite", "overrefusal", "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "o")]
    assert main([*base, "--model", str(tmp_path / "tiny")]) == 0
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "holds generations of model" in err and "pass --overwrite or another --out" in err
    assert main([*base, "--overwrite"]) == 0
    fps = {g["model"]["fingerprint"] for g in _jsonl(tmp_path / "o" / "generations.jsonl")}
    assert fps == {embedded.info.fingerprint} != {model_info(model).fingerprint}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suite", "harmfull"], "Unknown suite 'harmfull'; use a comma list of harmful, overrefusal, utility."),
        (["--datasets", "xstest-saf"], "Unknown dataset 'xstest-saf'. Did you mean 'xstest-safe'"),
        (["--datasets", "{csv}:nocol"], "has no column 'nocol' (for prompt); columns: goal"),
        (["--judge-url", "http://127.0.0.1:9/v1"], "'judge_url' configures llm, not one of --judge keyword"),
        (["--judge", "keyword,llm", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"],
         "Judge endpoint http://127.0.0.1:9/v1 does not answer"),
        (["--temperature", "-1"], "temperature=-1.0; use >= 0"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(args, message, tmp_path, capsys):
    csv = tmp_path / "mine.csv"
    csv.write_text("goal\nhello\n")
    args = [a.replace("{csv}", str(csv)) for a in args]
    assert main(["eval", "--limit", "1", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "o" / "generations.jsonl").exists()
