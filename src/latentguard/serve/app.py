"""The HTTP layer: `create_app(engine)` builds an OpenAI-compatible FastAPI app around an Engine.

Every error answers with OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`.
Streaming answers are server-sent events, `data: {...}` chunks closed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from latentguard.errors import ConfigError, LatentGuardError
from latentguard.serve.config import ServeConfig
from latentguard.serve.engine import Engine, GenerationError, GenerationResult, Job, RequestError
from latentguard.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    Usage,
)

__all__ = ["bind_socket", "create_app", "run_server"]


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


class _BodyLimit:
    """ASGI middleware: answer 413 to bodies past `max_bytes` (read to the end, so the client
    gets the answer instead of a reset connection), and replay smaller bodies to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, size, more = bytearray(), 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:
                body += chunk
            more = message.get("more_body", False)
        if size > self.max_bytes:
            msg = f"The request body has {size} bytes, over the limit of {self.max_bytes}; send less, or raise the server's --max-body-bytes."
            await _error(413, msg, "request_too_large")(scope, receive, send)
            return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # later calls wait for the disconnect, as streaming expects
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field and how to fix it."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON; send a JSON object.", None
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    got = "" if first.get("type") == "missing" else f" (got {repr(first.get('input'))[:80]})"
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return f"Invalid {where}: {first.get('msg', 'bad value')}{got}{more}; fix the request body.", where


async def _on_validation(request: Request, exc: Exception) -> Response:
    message, param = _validation_message(cast(RequestValidationError, exc))
    return _error(400, message, "invalid_request", param)


async def _on_request_error(request: Request, exc: Exception) -> Response:
    err = cast(RequestError, exc)
    response = _error(err.status, str(err), err.code, err.param)
    if err.status == 503:
        response.headers["Retry-After"] = "1"
    return response


async def _on_http_error(request: Request, exc: Exception) -> Response:
    err = cast(StarletteHTTPException, exc)
    return _error(err.status_code, f"{err.detail}: {request.method} {request.url.path}; see /docs for the routes.")


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    return _error(500, f"Internal error ({type(exc).__name__}: {exc}); check the server log.", "internal_error")


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def _submit(engine: Engine, body: GenerationRequest, prompts: list[list[int]]) -> list[Job]:
    engine.check_model(body.model)
    params = engine.params(body.max_tokens, body.temperature, body.top_p, body.seed, body.stop)
    try:
        defenses = await asyncio.to_thread(engine.resolve_defenses, body.defense)
    except LatentGuardError as e:
        raise RequestError(str(e), 400, "invalid_defense", "defense") from e
    return engine.submit(prompts, params, defenses, stream=body.stream)


def _meta(engine: Engine, prefix: str, jobs: list[Job]) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_id,
            "system_fingerprint": engine.loaded.info.fingerprint, "defense": list(jobs[0].defenses)}


def _usage(results: list[GenerationResult]) -> Usage:
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(payload: Any) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


async def _results(jobs: list[Job]) -> list[GenerationResult]:
    try:
        return [await job.result() for job in jobs]
    except GenerationError as e:
        raise RequestError(str(e), 500, "generation_failed") from e
    finally:
        for job in jobs:
            job.cancel()  # a no-op for finished jobs; stops the rest if the client went away


def _event_stream(chunks: AsyncIterator[str], jobs: list[Job]) -> StreamingResponse:
    async def framed() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except GenerationError as e:
            yield _sse(ErrorResponse(error=ErrorDetail(message=str(e), type="server_error", code="generation_failed")))
        finally:
            for job in jobs:
                job.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(framed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    engine = _engine(request)
    prompt = engine.encode_chat([m.model_dump() for m in body.messages])
    jobs = await _submit(engine, body, [prompt])
    meta = _meta(engine, "chatcmpl", jobs)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _event_stream(_chat_chunks(jobs[0], meta, usage), jobs)
    (result,) = await _results(jobs)
    choice = ChatChoice(index=0, message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
    return JSONResponse(ChatCompletion(**meta, choices=[choice], usage=_usage([result])).model_dump())


async def _chat_chunks(job: Job, meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: ChatDelta, finish: Any = None, usage: Usage | None = None) -> str:
        choices = [] if usage else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return _sse(ChatCompletionChunk(**meta, choices=choices, usage=usage))

    yield chunk(ChatDelta(role="assistant", content=""))
    async for item in job.events():
        if isinstance(item, str):
            yield chunk(ChatDelta(content=item))
        else:
            yield chunk(ChatDelta(), item.finish_reason)
            if include_usage:
                yield chunk(ChatDelta(), usage=_usage([item]))


async def completions(request: Request, body: CompletionRequest) -> Response:
    engine = _engine(request)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    jobs = await _submit(engine, body, [engine.encode_text(p) for p in prompts])
    meta = _meta(engine, "cmpl", jobs)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _event_stream(_completion_chunks(jobs, meta, usage), jobs)
    results = await _results(jobs)
    choices = [CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)]
    return JSONResponse(Completion(**meta, choices=choices, usage=_usage(results)).model_dump())


async def _completion_chunks(jobs: list[Job], meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    results = []
    for index, job in enumerate(jobs):  # jobs run batched; later ones wait buffered in their queues
        async for item in job.events():
            text, finish = (item, None) if isinstance(item, str) else ("", item.finish_reason)
            yield _sse(CompletionChunk(**meta, choices=[CompletionChoice(index=index, text=text, finish_reason=finish)]))
            if isinstance(item, GenerationResult):
                results.append(item)
    if include_usage:
        yield _sse(CompletionChunk(**meta, choices=[], usage=_usage(results)))


async def list_models(request: Request) -> ModelList:
    engine = _engine(request)
    return ModelList(data=[ModelCard(id=engine.model_id, created=engine.created)])


async def health(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    return {"status": "ok", "model": engine.model_id, "fingerprint": engine.loaded.info.fingerprint}


async def stats(request: Request) -> dict[str, Any]:
    return _engine(request).stats()


def create_app(engine: Engine) -> FastAPI:
    """An OpenAI-compatible app serving `engine`; its lifespan starts and drains the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close, engine.config.shutdown_timeout)

    app = FastAPI(title="latentguard", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_BodyLimit, max_bytes=engine.config.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(RequestError, _on_request_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/stats", stats, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free port (read it from `getsockname()`)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(
            f"Cannot listen on {host}:{port} ({e.strerror or e}); pick another --host/--port (0 picks a free port)."
        ) from e
    sock.listen(2048)
    return sock


@contextlib.contextmanager
def _quiet_reraise() -> Iterator[None]:
    """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; make that a clean return."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_server(app: FastAPI, sock: socket.socket, config: ServeConfig) -> None:
    """Serve `app` on `sock` until SIGINT/SIGTERM, letting in-flight requests finish."""
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=config.log_level, timeout_graceful_shutdown=config.shutdown_timeout, lifespan="on",
    ))
    with _quiet_reraise():
        server.run(sockets=[sock])
