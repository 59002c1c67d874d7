"""A real `latentguard serve` on 127.0.0.1 in a subprocess, for any test that needs an endpoint.

Use the pytest fixture (one server per test module; the embedded model):

    from tests.serve.server_fixture import embedded_server  # noqa: F401  (registers the fixture)

    def test_judge(embedded_server):
        httpx.post(f"{embedded_server.api_base}/chat/completions", json={...})

or start one with other flags:

    with serve_subprocess("embedded", "--max-batch-size", "4") as server:
        ...

The server binds port 0 and prints its URL, so there is no free-port race. Torch is pinned to
one thread in the child (on 2 cores a second spinning thread slows generation about 5x).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

__all__ = ["ServerHandle", "embedded_server", "serve_subprocess", "stop_server"]

_URL = re.compile(r"(http://\S+)/v1\b")
STARTUP_TIMEOUT_S = 300.0
SHUTDOWN_TIMEOUT_S = 60.0


@dataclass
class ServerHandle:
    """A running server: `url` is `http://127.0.0.1:PORT`, `api_base` adds `/v1` (OpenAI clients)."""

    url: str
    model_id: str
    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return "".join(self.log)


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def _pump(proc: subprocess.Popen[str], log: list[str], found: dict[str, str], ready: threading.Event) -> None:
    """Copy the child's output into `log`; note the first URL it prints."""
    for line in proc.stdout or ():
        log.append(line)
        match = _URL.search(line)
        if match and "url" not in found:
            found["url"] = match.group(1)
            ready.set()
    ready.set()  # the child closed its output: it exited


def _wait_healthy(url: str, proc: subprocess.Popen[str], deadline: float, log: list[str]) -> str:
    """Poll /health until it answers 200; return the served model id."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            r = httpx.get(f"{url}/health", timeout=5.0)
            if r.status_code == 200:
                return str(r.json()["model"])
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"latentguard serve at {url} never became healthy (exit {proc.poll()}):\n{''.join(log)}")


def stop_server(proc: subprocess.Popen[str], timeout: float = SHUTDOWN_TIMEOUT_S) -> int:
    """SIGTERM (graceful: in-flight requests finish), then SIGKILL after `timeout`; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)


@contextmanager
def serve_subprocess(
    model: str = "embedded",
    *args: str,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> Iterator[ServerHandle]:
    """Run `latentguard serve --model MODEL --host 127.0.0.1 --port 0 ARGS...` until the block exits."""
    cmd = [sys.executable, "-m", "latentguard.cli.main", "serve", "--model", model,
           "--host", "127.0.0.1", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_child_env(env), bufsize=1)
    log: list[str] = []
    found: dict[str, str] = {}
    ready = threading.Event()
    pump = threading.Thread(target=_pump, args=(proc, log, found, ready), daemon=True)
    pump.start()
    try:
        deadline = time.monotonic() + startup_timeout
        ready.wait(startup_timeout)
        if "url" not in found:
            raise RuntimeError(f"latentguard serve printed no URL (exit {proc.poll()}):\n{''.join(log)}")
        model_id = _wait_healthy(found["url"], proc, deadline, log)
        yield ServerHandle(url=found["url"], model_id=model_id, process=proc, log=log)
    finally:
        stop_server(proc)
        pump.join(timeout=10)


@pytest.fixture(scope="module")
def embedded_server() -> Iterator[ServerHandle]:
    """`latentguard serve --model embedded` for the tests of one module (greedy by default)."""
    with serve_subprocess("embedded") as server:
        yield server
