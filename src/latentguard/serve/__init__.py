"""OpenAI-compatible serving with per-request defences: `create_app(Engine(load_model(...)))`."""

from latentguard.serve.app import bind_socket, create_app, run_server
from latentguard.serve.config import ServeConfig
from latentguard.serve.engine import (
    Engine,
    GenerationError,
    GenerationResult,
    Job,
    RequestError,
    SamplingParams,
)

__all__ = [
    "Engine",
    "GenerationError",
    "GenerationResult",
    "Job",
    "RequestError",
    "SamplingParams",
    "ServeConfig",
    "bind_socket",
    "create_app",
    "run_server",
]
