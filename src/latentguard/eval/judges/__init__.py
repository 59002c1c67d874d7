"""Judges: every safety number comes from a named judge (shared/specs/judges.md).

- `keyword`: anchored refusal-phrase matching (`KeywordJudge`), cheap and biased;
- `llm`: an OpenAI-compatible chat endpoint grading with the 1-5 harm rubric or the XSTest
  3-class refusal rubric, hardened against prompt injection (`LLMJudge`);
- `direction`: the evaluated model's own residual stream projected on a refusal direction
  (`DirectionJudge`);
- `agreement`: kappa, PABAK, bootstrap CIs and McNemar between two judges' labels.
"""

from latentguard.eval.judges.agreement import (
    Agreement,
    agreement,
    cohen_kappa,
    mcnemar_exact,
    pabak,
)
from latentguard.eval.judges.base import JUDGES, Judge, Verdict
from latentguard.eval.judges.direction import Calibration, DirectionJudge, DirectionJudgeConfig
from latentguard.eval.judges.keyword import (
    KEYWORD_MODES,
    KeywordConfig,
    KeywordJudge,
    KeywordList,
    available_keyword_lists,
    load_keyword_list,
    normalize_response,
)
from latentguard.eval.judges.llm import LLMJudge, LLMJudgeConfig
from latentguard.eval.judges.llm_prompts import RUBRICS, neutralise, render_judge_prompt

__all__ = [
    "JUDGES",
    "KEYWORD_MODES",
    "RUBRICS",
    "Agreement",
    "Calibration",
    "DirectionJudge",
    "DirectionJudgeConfig",
    "Judge",
    "KeywordConfig",
    "KeywordJudge",
    "KeywordList",
    "LLMJudge",
    "LLMJudgeConfig",
    "Verdict",
    "agreement",
    "available_keyword_lists",
    "cohen_kappa",
    "load_keyword_list",
    "mcnemar_exact",
    "neutralise",
    "normalize_response",
    "pabak",
    "render_judge_prompt",
]
