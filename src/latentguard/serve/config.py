"""Settings of `latentguard serve`: one dataclass; the CLI builds its flags from the fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentguard.errors import ConfigError

__all__ = ["ServeConfig"]

_DTYPES = ("float32", "bfloat16", "float16")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServeConfig:
    model: str = field(default="embedded", metadata={"help": "embedded, a model directory, a .gguf file or a hub id"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on; 0 picks a free one (the URL is printed)"})
    defense: list[str] = field(
        default_factory=list,
        metadata={"cli": False, "help": "defence specs applied when a request names none (NAME[:ARTEFACT][,k=v])"},
    )
    max_batch_size: int = field(default=8, metadata={"help": "most requests merged into one generate call"})
    queue_size: int = field(default=64, metadata={"help": "most requests waiting; beyond it the server answers 503"})
    max_tokens_limit: int = field(default=512, metadata={"help": "largest max_tokens a request may ask for"})
    default_max_tokens: int = field(default=128, metadata={"help": "max_tokens of a request that gives none"})
    batch_wait_ms: float = field(default=10.0, metadata={"help": "how long the batcher waits for more requests"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body; larger ones get 413"})
    shutdown_timeout: int = field(default=30, metadata={"help": "seconds in-flight requests get on SIGINT/SIGTERM"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})
    dtype: str = field(default="float32", metadata={"help": "torch dtype of the weights: float32, bfloat16, float16"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (or a file) replacing the tokenizer's"})
    log_level: str = field(default="info", metadata={"help": f"uvicorn log level: {', '.join(_LOG_LEVELS)}"})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} is out of range; pass 0..65535 (0 picks a free port).")
        if not isinstance(self.defense, list) or not all(isinstance(s, str) for s in self.defense):
            raise ConfigError(f"defense={self.defense!r} must be a list of spec strings; write `defense: [SPEC, ...]`.")
        for name in ("max_batch_size", "queue_size", "max_tokens_limit", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; pass a positive integer.")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ConfigError(
                f"default_max_tokens={self.default_max_tokens} is outside 1..max_tokens_limit="
                f"{self.max_tokens_limit}; lower it or raise --max-tokens-limit."
            )
        if self.batch_wait_ms < 0 or self.shutdown_timeout < 0:
            raise ConfigError(
                f"batch_wait_ms={self.batch_wait_ms}, shutdown_timeout={self.shutdown_timeout}; pass values >= 0."
            )
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is unknown; pass one of {', '.join(_DTYPES)}.")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError(f"log_level={self.log_level!r} is unknown; pass one of {', '.join(_LOG_LEVELS)}.")
