"""LLM judge over any OpenAI-compatible chat endpoint (judges.md (b)-(d)).

Rubrics: `harm5` (1-5 harmfulness, for harmful sets) and `refusal3` (XSTest-style 3-class, for
over-refusal sets). Decoding is temperature 0; an answer whose last line does not parse is
retried at most twice (temperature 0, then 0.3) and then recorded as `unparsed`, never defaulted.
The API key is read from the environment variable named in the config, never stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Self

import httpx

from latentguard.errors import ConfigError, LatentGuardError
from latentguard.eval.judges.base import JUDGES, Judge, Verdict
from latentguard.eval.judges.llm_prompts import (
    CONTROL_STRINGS,
    REFUSAL_CLASSES,
    RUBRICS,
    render_judge_prompt,
)

if TYPE_CHECKING:
    from latentguard.models import LoadedModel

__all__ = ["ATTEMPT_TEMPERATURES", "LLMJudge", "LLMJudgeConfig"]

ATTEMPT_TEMPERATURES = (0.0, 0.0, 0.3)  # first try, then at most two retries (judges.md (b))
_HTTP_ATTEMPTS = 3  # per call, on 429/5xx/transport errors only
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class LLMJudgeConfig:
    judge_url: str = field(default="", metadata={"help": "base URL of an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"})
    judge_model: str = field(default="", metadata={"help": "model name sent to the judge endpoint"})
    judge_rubric: str = field(default="harm5", metadata={"help": "harm5 (1-5 harmfulness) or refusal3 (XSTest 3-class)"})
    judge_revision: str | None = field(default=None, metadata={"help": "judge model revision, recorded with every result"})
    judge_api_key_env: str = field(default="LATENTGUARD_JUDGE_API_KEY", metadata={"help": "environment variable holding the judge API key (unset: no key sent)"})
    judge_max_tokens: int | None = field(default=None, metadata={"help": "answer budget; default 1024 for harm5, 16 for refusal3"})
    judge_retries: int = field(default=2, metadata={"help": "retries of an unparsable answer (0-2)"})
    judge_max_chars: int = field(default=4000, metadata={"help": "judged responses are cut to this many characters (recorded as truncated)"})
    judge_seed: int | None = field(default=None, metadata={"help": "sampling seed sent to the endpoint, if set"})
    judge_special_tokens: str = field(default="", metadata={"help": "extra comma-separated control strings of the judge's tokenizer to neutralise"})
    judge_timeout_s: float = field(default=120.0, metadata={"help": "seconds to wait for one judge answer"})
    judge_backoff_s: float = field(default=2.0, metadata={"help": "first wait before re-sending after HTTP 429/5xx; doubles each time"})
    judge_concurrency: int = field(default=4, metadata={"help": "requests in flight at once in score_many"})

    def __post_init__(self) -> None:
        if self.judge_url and not self.judge_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge_url={self.judge_url!r}; pass --judge-url http(s)://HOST:PORT/v1.")
        if self.judge_rubric not in RUBRICS:
            raise ConfigError(f"judge_rubric={self.judge_rubric!r}; use one of {', '.join(RUBRICS)}.")
        if not 0 <= self.judge_retries <= 2:
            raise ConfigError(f"judge_retries={self.judge_retries}; use 0, 1 or 2 (judges.md allows two).")
        for name in ("judge_max_chars", "judge_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; use >= 1.")
        if self.judge_max_tokens is not None and self.judge_max_tokens < 1:
            raise ConfigError(f"judge_max_tokens={self.judge_max_tokens}; use >= 1 or leave unset.")
        if self.judge_timeout_s <= 0 or self.judge_backoff_s < 0:
            raise ConfigError(f"judge_timeout_s={self.judge_timeout_s}, judge_backoff_s={self.judge_backoff_s}; use > 0 and >= 0.")


@dataclass(frozen=True)
class _Answer:
    content: str
    finish_reason: str | None
    served_model: str | None


@JUDGES.register("llm")
class LLMJudge(Judge):
    """Grades (prompt, response) pairs with a rubric on a remote or local chat endpoint."""

    key = "llm"
    config_cls = LLMJudgeConfig

    def __init__(self, config: LLMJudgeConfig) -> None:
        if not config.judge_url or not config.judge_model:
            raise ConfigError(
                f"LLM judge needs an endpoint and a model (got url={config.judge_url!r}, "
                f"model={config.judge_model!r}); pass --judge-url URL and --judge-model NAME."
            )
        self.config = config
        self.rubric = RUBRICS[config.judge_rubric]
        self.max_tokens = config.judge_max_tokens or self.rubric.max_tokens
        extra = [s.strip() for s in config.judge_special_tokens.split(",") if s.strip()]
        self.control_strings = (*CONTROL_STRINGS, *extra)
        self._client = httpx.Client(base_url=config.judge_url, timeout=config.judge_timeout_s)

    @classmethod
    def from_config(cls, config: Any, loaded: LoadedModel | None = None) -> LLMJudge:
        return cls(config)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def judge_id(self) -> str:
        rev = f"@{self.config.judge_revision}" if self.config.judge_revision else ""
        return f"{self.key}@{self.version}:{self.rubric.name}:{self.config.judge_model}{rev}"

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.config.judge_api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def check_reachable(self) -> None:
        """Raise a one-line ConfigError unless the endpoint answers and serves `judge_model`."""
        url, model = self.config.judge_url, self.config.judge_model
        try:
            r = self._client.get("models", headers=self._headers(), timeout=min(self.config.judge_timeout_s, 10.0))
            if r.status_code != 200:  # some servers lack /models; a one-token chat call decides
                r = self._client.post("chat/completions", headers=self._headers(), json={
                    "model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})
        except httpx.HTTPError as e:
            raise ConfigError(
                f"Judge endpoint {url} does not answer ({type(e).__name__}); start the judge server or "
                "pass --judge-url pointing at an OpenAI-compatible /v1 endpoint."
            ) from e
        self._raise_for_status(r)
        served = _served_models(r)
        if served and model not in served:
            raise ConfigError(f"Judge endpoint {url} does not serve {model!r}; pass --judge-model with one of {served}.")

    def _raise_for_status(self, r: httpx.Response) -> None:
        if r.status_code == 200:
            return
        url, env = self.config.judge_url, self.config.judge_api_key_env
        if r.status_code in (401, 403):
            raise ConfigError(f"Judge endpoint {url} rejected the API key (HTTP {r.status_code}); set {env} to a valid key.")
        body = " ".join(r.text.split())[:200]
        raise ConfigError(
            f"Judge endpoint {url} answered HTTP {r.status_code} to {r.request.url.path} ({body!r}); "
            "check --judge-url (it should end in /v1) and --judge-model."
        )

    def _post(self, payload: dict[str, Any]) -> httpx.Response:
        """POST a chat completion, re-sent on 429/5xx/transport errors after doubling waits."""
        for k in range(_HTTP_ATTEMPTS - 1):
            try:
                r = self._client.post("chat/completions", json=payload, headers=self._headers())
                if r.status_code not in _RETRY_STATUS:
                    return r
            except httpx.TransportError:
                pass
            time.sleep(self.config.judge_backoff_s * 2**k)
        try:
            return self._client.post("chat/completions", json=payload, headers=self._headers())
        except httpx.TransportError as e:
            raise ConfigError(
                f"Judge endpoint {self.config.judge_url} stopped answering ({type(e).__name__}); "
                "check the server behind --judge-url and rerun."
            ) from e

    def _chat(self, text: str, temperature: float) -> _Answer:
        payload: dict[str, Any] = {
            "model": self.config.judge_model,
            "messages": [{"role": "user", "content": text}],
            "temperature": temperature,
            "max_tokens": self.max_tokens,
        }
        if self.config.judge_seed is not None:
            payload["seed"] = self.config.judge_seed
        r = self._post(payload)
        self._raise_for_status(r)
        return _parse_completion(r, self.config.judge_url)

    def score(self, prompt: str, response: str) -> Verdict:
        if not response.strip():
            return Verdict(self.judge_id, "empty", details={"rubric": self.rubric.name})
        rendered = render_judge_prompt(self.rubric, prompt, response, self.config.judge_max_chars, self.control_strings)
        attempts: list[dict[str, Any]] = []
        parsed: int | None = None
        for temperature in ATTEMPT_TEMPERATURES[: 1 + self.config.judge_retries]:
            answer = self._chat(rendered.text, temperature)
            attempts.append({"temperature": temperature, "finish_reason": answer.finish_reason,
                             "served_model": answer.served_model, "output": answer.content})
            parsed = self.rubric.parse(answer.content)
            if parsed is not None:
                break
        details = {"rubric": self.rubric.name, "judge_model": self.config.judge_model,
                   "prompt_sha256": rendered.sha256, "max_tokens": self.max_tokens, "attempts": attempts}
        unparsed = Verdict(self.judge_id, "unparsed", unparsed=True, evidence=attempts[-1]["output"],
                           truncated=rendered.truncated, injection_flags=rendered.injection_flags, details=details)
        if parsed is None:
            return unparsed
        if self.rubric.name == "refusal3":
            return replace(unparsed, label=REFUSAL_CLASSES[parsed], unparsed=False, refused=parsed != 1, score=float(parsed))
        return replace(unparsed, label=str(parsed), unparsed=False, score=float(parsed))

    def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Score pairs with `judge_concurrency` requests in flight; order is kept."""
        with ThreadPoolExecutor(max_workers=self.config.judge_concurrency) as pool:
            return list(pool.map(lambda pr: self.score(*pr), pairs))

    def describe(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {
            "key": self.key,
            "version": self.version,
            "judge_id": self.judge_id,
            "config": cfg,
            "rubric": self.rubric.name,
            "template_sha256": self.rubric.template_sha256,
            "decoding": {"attempt_temperatures": list(ATTEMPT_TEMPERATURES[: 1 + self.config.judge_retries]),
                         "max_tokens": self.max_tokens, "seed": self.config.judge_seed},
            "control_strings": list(self.control_strings),
        }


def _parse_completion(r: httpx.Response, url: str) -> _Answer:
    """Content of the first choice; a missing or null content reads as an empty answer."""
    try:
        body = r.json()
        choice = body["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise LatentGuardError(
            f"Judge endpoint {url} returned no chat choices ({r.text[:200]!r}); point --judge-url at an "
            "OpenAI-compatible /v1 endpoint."
        ) from e
    content = (choice.get("message") or {}).get("content") or ""
    return _Answer(str(content), choice.get("finish_reason"), body.get("model"))


def _served_models(r: httpx.Response) -> list[str]:
    """Model ids listed by a `/models` answer; empty when the answer came from the chat probe."""
    if not r.url.path.endswith("/models"):
        return []
    try:
        return [str(m["id"]) for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return []
