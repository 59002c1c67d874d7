"""OpenAI-compatible request and response bodies, plus the `defense` extension field.

Requests ignore OpenAI fields we do not implement (logprobs, penalties, user, ...). Generation is
greedy unless `temperature > 0` (OpenAI's default is 1; greedy keeps evaluations reproducible).
The `max_tokens` ceiling is the server's `--max-tokens-limit`, checked by the engine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionRequest",
    "ErrorDetail",
    "ErrorResponse",
    "GenerationRequest",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "Usage",
]

FinishReason = Literal["stop", "length"]
MAX_STOP_STRINGS = 4


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("content is empty; send some text")
        return v


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    defense: list[str] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        v = [] if v is None else [v] if isinstance(v, str) else v
        if isinstance(v, list) and (len(v) > MAX_STOP_STRINGS or any(s == "" for s in v)):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        return v

    @field_validator("n")
    @classmethod
    def _single_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"n={v} is not supported; send n=1 and repeat the request for more samples")
        return v

    @field_validator("defense", mode="before")
    @classmethod
    def _defense_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt is empty; send a non-empty string or list of strings")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str
    defense: list[str] = Field(default_factory=list, description="defence specs applied (latentguard extension)")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "latentguard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
