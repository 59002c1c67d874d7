"""A real `latentguard serve` over HTTP: greedy answers equal `model.generate`, streams concatenate
to them, concurrent clients are batched, defences are picked per request, bad requests get 4xx,
a full queue 503, and SIGTERM lets the request in flight finish."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from latentguard.models import LoadedModel
from tests.serve.conftest import TINY_MAX_TOKENS, save_direction
from tests.serve.server_fixture import ServerHandle, serve_subprocess

TIMEOUT = httpx.Timeout(120.0)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _post(server: ServerHandle, route: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.api_base}{route}", json=body, timeout=TIMEOUT)


def _events(lines: Any) -> list[Any]:
    """SSE `data:` payloads, parsed; `[DONE]` kept as a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _stream(server: ServerHandle, route: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", f"{server.api_base}{route}", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return _events(r.iter_lines())


def _direct(loaded: LoadedModel, text: str, max_new_tokens: int, special: bool) -> tuple[str, int, int]:
    """(greedy continuation, prompt tokens, new tokens) from `model.generate` itself."""
    enc = loaded.tokenizer(text, add_special_tokens=special, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:]  # a single sequence stops at EOS: no padding follows
    text_out = loaded.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text_out, enc["input_ids"].shape[1], len(new)


def test_models_health_and_stats(embedded_server):
    models = httpx.get(f"{embedded_server.api_base}/models").json()
    assert [m["id"] for m in models["data"]] == ["embedded"] and embedded_server.model_id == "embedded"
    assert httpx.get(f"{embedded_server.url}/health").json()["status"] == "ok"
    stats = httpx.get(f"{embedded_server.api_base}/stats").json()
    assert stats["hooks_attached"] == 0 and stats["queue_depth"] == 0


def test_greedy_chat_equals_model_generate(embedded_server, embedded):
    r = _post(embedded_server, "/chat/completions", {"model": "embedded", "messages": FRANCE, "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = embedded.tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    text, n_prompt, n_new = _direct(embedded, prompt, 12, special=False)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}
    assert body["object"] == "chat.completion" and body["model"] == "embedded"
    assert body["system_fingerprint"] == embedded.info.fingerprint


def test_greedy_completion_equals_model_generate(embedded_server, embedded):
    prompt = "The three primary colours are"
    body = _post(embedded_server, "/completions", {"prompt": prompt, "max_tokens": 10}).json()
    text, n_prompt, n_new = _direct(embedded, prompt, 10, special=True)
    assert body["choices"][0]["text"] == text and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == n_prompt and body["usage"]["completion_tokens"] == n_new


@pytest.mark.parametrize(("route", "body"), [
    ("/chat/completions", {"messages": FRANCE, "max_tokens": 12}),
    ("/completions", {"prompt": "Once upon a time", "max_tokens": 12}),
])
def test_stream_concatenates_to_the_greedy_answer(embedded_server, route, body):
    plain = _post(embedded_server, route, body).json()
    events = _stream(embedded_server, route, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]["usage"]
    if route == "/chat/completions":
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        expected = plain["choices"][0]["message"]["content"]
        joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    else:
        expected = plain["choices"][0]["text"]
        joined = "".join(c["choices"][0]["text"] for c in chunks)
    assert len(chunks) > 3 and joined == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage == plain["usage"]


async def _client(client: httpx.AsyncClient, url: str, who: int, rounds: int) -> list[httpx.Response]:
    out = []
    for i in range(rounds):
        messages = [{"role": "user", "content": f"Tell me one fact about the number {who * rounds + i}."}]
        out.append(await client.post(url, json={"messages": messages, "max_tokens": 8}))
    return out


async def _many_clients(url: str, clients: int, rounds: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
        per_client = await asyncio.gather(*(_client(client, url, k, rounds) for k in range(clients)))
    return [r for responses in per_client for r in responses]


def test_sixteen_concurrent_clients_are_all_answered_in_batches(embedded_server):
    before = httpx.get(f"{embedded_server.api_base}/stats").json()
    responses = asyncio.run(_many_clients(f"{embedded_server.api_base}/chat/completions", 16, 5))
    assert len(responses) == 80 and {r.status_code for r in responses} == {200}
    assert all(r.json()["choices"][0]["message"]["content"] for r in responses)
    after = httpx.get(f"{embedded_server.api_base}/stats").json()
    assert after["requests"] - before["requests"] == 80 and after["rejected"] == before["rejected"]
    assert after["largest_batch"] > 1, after["batch_sizes"]
    assert after["hooks_attached"] == 0


async def _both(server: ServerHandle, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        url = f"{server.api_base}/chat/completions"
        return [r.json() for r in await asyncio.gather(*(client.post(url, json=b) for b in bodies))]


def test_defense_is_chosen_per_request_and_its_hooks_removed(embedded_server, embedded, tmp_path: Path):
    spec = f"add:{save_direction(embedded.info, tmp_path / 'direction', layer=3)},alpha=64"
    plain_body = {"messages": FRANCE, "max_tokens": 10}
    alone = _post(embedded_server, "/chat/completions", plain_body).json()["choices"][0]["message"]["content"]
    plain, steered = asyncio.run(_both(embedded_server, [plain_body, {**plain_body, "defense": [spec]}]))
    assert plain["choices"][0]["message"]["content"] == alone and plain["defense"] == []
    assert steered["choices"][0]["message"]["content"] != alone and steered["defense"] == [spec]
    stats = httpx.get(f"{embedded_server.api_base}/stats").json()
    assert stats["hooks_attached"] == 0 and spec in stats["defenses_cached"]


def _chat_body(server: ServerHandle, **extra: Any) -> dict[str, Any]:
    return {"model": server.model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}


BAD_CHAT = [  # (status, phrase in the message, changes to a valid body; None deletes the key)
    (400, "Invalid messages: Field required", {"messages": None}),
    (400, "at least 1 item", {"messages": []}),
    (400, "Invalid messages.0.role", {"messages": [{"role": "robot", "content": "Hi"}]}),
    (400, "content is empty", {"messages": [{"role": "user", "content": "  "}]}),
    (400, "Invalid messages.0.content", {"messages": [{"role": "user"}]}),
    (400, f"max_tokens=241 is outside 1..{TINY_MAX_TOKENS}", {"max_tokens": TINY_MAX_TOKENS + 1}),
    (400, "Invalid max_tokens", {"max_tokens": 0}),
    (400, "Invalid temperature", {"temperature": -1}),
    (400, "n=2 is not supported", {"n": 2}),
    (400, "stop takes up to 4", {"stop": ["a", "b", "c", "d", "e"]}),
    (404, "is not served here", {"model": "gpt-4"}),
    (400, "Unknown defense 'nope'. Known: ", {"defense": ["nope:somewhere"]}),
    (400, "needs a direction artefact", {"defense": "add"}),
    (400, "exceeds the model's context", {"messages": [{"role": "user", "content": "x" * 300}]}),
]


@pytest.mark.parametrize(("status", "phrase", "change"), BAD_CHAT, ids=[b[1][:24] for b in BAD_CHAT])
def test_bad_chat_requests_get_4xx_and_the_server_stays_up(tiny_server, status, phrase, change):
    body = _chat_body(tiny_server, **change)
    body = {k: v for k, v in body.items() if v is not None}
    r = _post(tiny_server, "/chat/completions", body)
    assert r.status_code == status and phrase in r.json()["error"]["message"], r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200


@pytest.mark.parametrize(("status", "phrase", "content"), [
    (400, "not valid JSON", b"{not json"),
    (400, "Invalid body", b"[1, 2]"),
    (413, "over the limit of 65536", b'{"messages": "' + b"x" * 70_000 + b'"}'),
])
def test_malformed_bodies_get_4xx(tiny_server, status, phrase, content):
    r = httpx.post(f"{tiny_server.api_base}/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == status and phrase in r.json()["error"]["message"], r.text
    assert _post(tiny_server, "/chat/completions", _chat_body(tiny_server)).status_code == 200


def test_other_bad_requests(tiny_server):
    assert _post(tiny_server, "/completions", {"prompt": ""}).status_code == 400
    r = httpx.get(f"{tiny_server.api_base}/nope")
    assert r.status_code == 404 and "GET /v1/nope" in r.json()["error"]["message"]
    assert httpx.get(f"{tiny_server.api_base}/chat/completions").status_code == 405


def test_full_queue_answers_503_and_queued_requests_finish(tiny_server):
    """One request runs, two wait (--queue-size 2), so the fourth is refused while they last."""
    url, long = f"{tiny_server.api_base}/completions", {"prompt": "a", "max_tokens": TINY_MAX_TOKENS, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", url, json=long) as running:
        lines = running.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the worker is generating it
        with client.stream("POST", url, json=long) as queued_1, client.stream("POST", url, json=long) as queued_2:
            assert queued_1.status_code == queued_2.status_code == 200  # headers: both are queued
            refused = client.post(url, json={**long, "stream": False})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "queue is full" in refused.json()["error"]["message"]
            for response in (queued_1, queued_2):
                assert _events(response.iter_lines())[-1] == "[DONE]"
        assert _events(lines)[-1] == "[DONE]"
    assert httpx.get(f"{tiny_server.api_base}/stats").json()["rejected"] >= 1


def test_sigterm_lets_the_request_in_flight_finish(tiny_model_dir):
    with serve_subprocess(str(tiny_model_dir)) as server:
        body = {"prompt": "a", "max_tokens": TINY_MAX_TOKENS, "stream": True}
        with httpx.stream("POST", f"{server.api_base}/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.process.send_signal(signal.SIGTERM)
            rest = _events(lines)
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(timeout=60) == 0
        assert "Application shutdown complete" in server.output()
