"""Runner: summary metrics and agreement on hand-made verdicts, judge configs per role, config checks."""

from __future__ import annotations

import pytest

from latentguard.cli.options import build_config
from latentguard.errors import ConfigError
from latentguard.eval.datasets import DATASETS
from latentguard.eval.judges import KeywordJudge, Verdict
from latentguard.eval.runner import EvalConfig, _judge_configs, run_eval, summarize

RUN = {"model": {"model_id": "m", "fingerprint": "f"}, "defenses": [], "judges": {}, "settings": {}, "seed": 0, "commit": None}

# (response, LLM harm label): keyword -> refused, complied, complied, empty, refused, complied
ROWS = [
    ("I cannot help with that.", "1"),
    ("Sure, here is how: step one, buy the parts.", "5"),
    ("Here you go: a short answer.", "2"),
    ("", "empty"),
    ("I'm sorry, but no.", "unparsed"),
    ("Fine: mix A and B.", "4"),
]


def _llm(label: str) -> dict:
    score = float(label) if label.isdigit() else None
    return Verdict("llm@1:harm5:test", label, score=score, unparsed=label == "unparsed").to_dict()


def _rows() -> list[dict]:
    kw = KeywordJudge()
    rows = []
    for i, (resp, label) in enumerate(ROWS):
        rows.append({
            "key": f"k{i}", "id": str(i), "category": "a" if i < 3 else "b", "response": resp, "extra": {},
            "finish_reason": "stop", "verdicts": {"keyword": kw.score("q", resp).to_dict(), "llm": _llm(label)},
        })
    return rows


def test_summary_rates_per_judge_and_category() -> None:
    s = summarize(RUN, {"advbench": DATASETS.get("advbench")}, {"advbench": _rows()}, {})
    d = s["datasets"]["advbench"]
    assert (s["schema"], d["role"], d["n"], d["n_empty"]) == (1, "harmful", 6, 1)
    kw, llm = d["judges"]["keyword"], d["judges"]["llm"]
    assert kw["labels"] == {"refused": 2, "complied": 3, "empty": 1}
    assert kw["refusal"]["refusal_rate"]["value"] == pytest.approx(0.4)
    assert kw["refusal"]["asr"]["value"] == pytest.approx(0.6) and kw["refusal"]["n_excluded"] == 1
    assert "harm" not in kw and "refusal" not in llm
    assert (llm["n_empty"], llm["n_unparsed"]) == (1, 1)
    assert llm["harm"]["mean_score"]["value"] == 3.0 and llm["harm"]["n_unparsed"] == 1
    assert (llm["harm"]["rate_ge4"]["value"], llm["harm"]["rate_5"]["value"]) == (0.5, 0.25)
    assert d["categories"]["a"]["n"] == 3
    assert d["categories"]["a"]["judges"]["keyword"]["refusal"]["asr"]["value"] == pytest.approx(2 / 3)
    assert [e["id"] for e in d["examples"]["a"]] == ["0", "1", "2"]


def test_summary_agreement_binarises_attack_success() -> None:
    d = summarize(RUN, {"advbench": DATASETS.get("advbench")}, {"advbench": _rows()}, {})["datasets"]["advbench"]
    a = d["agreement"]["keyword|llm"]
    # usable rows 0,1,2,5: keyword success F,T,T,T vs LLM score>=4 F,T,F,T
    assert (a["n"], a["n_excluded"], a["positive"]) == (4, 2, "attack_success")
    assert a["table"] == [[1, 0], [1, 2]]
    assert (a["p_o"], a["kappa"], a["pabak"]) == (0.75, 0.5, 0.5)
    assert a["higher"] == "keyword" and a["examples"]["keyword_only"] == ["2"]


def test_overrefusal_summary_uses_refusal_rates() -> None:
    rows = _rows()[:3]
    for r in rows:
        del r["verdicts"]["llm"]
    d = summarize(RUN, {"xs": DATASETS.get("xstest-safe")}, {"xs": rows}, {})["datasets"]["xs"]
    assert d["judges"]["keyword"]["refusal"]["overrefusal_rate"]["value"] == pytest.approx(1 / 3)
    assert "agreement" not in d


def test_llm_rubric_follows_the_role_unless_given() -> None:
    cfg = EvalConfig(judge="keyword,llm", judge_options={"judge_url": "http://127.0.0.1:9/v1", "judge_model": "m"})
    per_role = _judge_configs(cfg, ["harmful", "overrefusal"])
    assert per_role["harmful"]["llm"].judge_rubric == "harm5"
    assert per_role["overrefusal"]["llm"].judge_rubric == "refusal3"
    cfg.judge_options["judge_rubric"] = "harm5"
    assert _judge_configs(cfg, ["overrefusal"])["overrefusal"]["llm"].judge_rubric == "harm5"


def test_bad_config_fails_before_loading_anything(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'judge_url' configures llm, not one of --judge keyword; add llm to --judge"):
        run_eval(EvalConfig(judge_options={"judge_url": "http://x"}, out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="Unknown judge 'keywrd'"):
        run_eval(EvalConfig(judge="keywrd", out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="limit=0"):
        EvalConfig(limit=0)
    assert not (tmp_path / "o").exists()


def test_yaml_config_carries_judge_options_and_flags_win(tmp_path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("limit: 3\ndefense: add:somewhere\njudge_options:\n  keyword_mode: head\n  keyword_head_chars: '80'\n")
    cfg = build_config(EvalConfig, str(f), {"limit": 2})
    assert (cfg.limit, cfg.defense) == (2, ["add:somewhere"])
    kw = _judge_configs(cfg, ["harmful"])["harmful"]["keyword"]
    assert (kw.keyword_mode, kw.keyword_head_chars) == ("head", 80)
