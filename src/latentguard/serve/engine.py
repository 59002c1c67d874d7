"""The serving engine: a bounded queue and one worker thread that batches compatible requests.

Requests with the same sampling settings and defences are merged into one left-padded
`model.generate` call; each sequence still stops at its own `max_tokens`, stop strings or EOS
(a stopping criterion that also streams the text). Defences are built once per spec string and
applied around each batch's generate only, so no hook outlives a batch.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import torch
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList

from latentguard.defenses import Defense, apply_defenses, build_defense
from latentguard.errors import LatentGuardError
from latentguard.hooks import count_hooks
from latentguard.models import LoadedModel, text_config
from latentguard.serve.config import ServeConfig

__all__ = ["Engine", "FinishReason", "GenerationError", "GenerationResult", "Job", "RequestError", "SamplingParams"]

FinishReason = Literal["stop", "length"]  # "stop": EOS or a stop string; "length": max_tokens


class RequestError(LatentGuardError, ValueError):
    """A request the server refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


class GenerationError(LatentGuardError, RuntimeError):
    """`model.generate` failed for a batch; every request in it gets this error."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class Job:
    """One prompt in flight. The worker posts text deltas (when streaming) and then the result."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, defenses: tuple[str, ...], stream: bool,
                 key: tuple[Any, ...]) -> None:
        self.prompt_ids, self.params, self.defenses, self.stream, self.key = prompt_ids, params, defenses, stream, key
        self.cancelled = False
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[str | GenerationResult | GenerationError] = asyncio.Queue()

    def post(self, item: str | GenerationResult | GenerationError) -> None:
        """Thread-safe: hand an event to the request's event loop (dropped if the loop is gone)."""
        if not isinstance(item, str):
            self.finished = True
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop closed: the client and the server are gone
            pass

    def cancel(self) -> None:
        """Stop generating for this job at the next step (the client went away)."""
        self.cancelled = True

    async def events(self) -> AsyncIterator[str | GenerationResult]:
        """Text deltas (streaming jobs only), then the final result; raises GenerationError."""
        while True:
            item = await self._events.get()
            if isinstance(item, GenerationError):
                raise item
            yield item
            if isinstance(item, GenerationResult):
                return

    async def result(self) -> GenerationResult:
        async for item in self.events():
            if isinstance(item, GenerationResult):
                return item
        raise GenerationError("The job ended without a result; retry the request.")


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may still turn into a stop string or a whole UTF-8 char."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class _Sequence:
    """Per-sequence decoding state: stop conditions and streamed text."""

    def __init__(self, job: Job, decode: Callable[[list[int]], str], eos: frozenset[int]) -> None:
        self.job, self._decode, self._eos = job, decode, eos
        self.sent = ""
        self.done = False

    def step(self, tokens: list[int]) -> None:
        """Look at the tokens generated so far; finish or stream what is stable."""
        n, params = len(tokens), self.job.params
        if tokens[-1] in self._eos:
            self.finish(self._decode(tokens[:-1]), n, "stop")
            return
        text = self._decode(tokens)
        cuts = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        if cuts:
            self.finish(text[: min(cuts)], n, "stop")
        elif n >= params.max_tokens or self.job.cancelled:
            self.finish(text, n, "length")
        elif self.job.stream:
            stable = text[: len(text) - _held_back(text, params.stop)]
            if len(stable) > len(self.sent):
                self.job.post(stable[len(self.sent):])
                self.sent = stable

    def finish(self, text: str, n_tokens: int, reason: FinishReason) -> None:
        if self.job.stream and len(text) > len(self.sent):
            self.job.post(text[len(self.sent):])
        self.job.post(GenerationResult(text, reason, len(self.job.prompt_ids), n_tokens))
        self.done = True


class _BatchTracker(StoppingCriteria):
    """Stopping criterion run after every generated token: per-sequence stops plus streaming."""

    def __init__(self, seqs: list[_Sequence], prompt_width: int) -> None:
        self.seqs, self.width = seqs, prompt_width

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        new = input_ids[:, self.width:].tolist()
        for seq, tokens in zip(self.seqs, new):
            if not seq.done:
                seq.step(tokens)
        return torch.tensor([s.done for s in self.seqs], dtype=torch.bool, device=input_ids.device)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class Engine:
    """Owns a LoadedModel and the batching worker; `start()` and `close()` bracket serving.

    Call `submit` from an asyncio event loop: results come back on that loop.
    """

    def __init__(self, loaded: LoadedModel, config: ServeConfig | None = None) -> None:
        self.loaded = loaded
        self.config = config or ServeConfig(model=loaded.info.model_id)
        self.created = int(time.time())
        self._tok_lock = threading.Lock()  # fast tokenizers fail when used from two threads at once
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._stopping = False
        self._running = 0
        self._worker: threading.Thread | None = None
        self._counts: Counter[str] = Counter()
        self._batch_sizes: Counter[int] = Counter()
        self._defense_lock = threading.Lock()
        self._defenses: dict[str, Defense] = {}
        self._solo = itertools.count()
        tok = loaded.tokenizer
        self._pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)
        self._eos = self._eos_ids()
        self._max_positions: int | None = getattr(text_config(loaded.model), "max_position_embeddings", None)
        self.default_defenses: tuple[str, ...] = ()
        self.default_defenses = self.resolve_defenses(self.config.defense)

    @property
    def model_id(self) -> str:
        return self.loaded.info.model_id

    def _eos_ids(self) -> frozenset[int]:
        eos = getattr(self.loaded.model.generation_config, "eos_token_id", None)
        ids = [*(eos if isinstance(eos, list) else [eos]), self.loaded.tokenizer.eos_token_id]
        return frozenset(int(i) for i in ids if i is not None)

    def check_model(self, name: str | None) -> None:
        """Accept a request's `model` field if it is absent or names the served model."""
        if name is not None and name != self.model_id:
            raise RequestError(
                f"Model {name!r} is not served here; send model={self.model_id!r} (see /v1/models).",
                404, "model_not_found", "model",
            )

    def params(self, max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: Sequence[str] = ()) -> SamplingParams:
        """Sampling settings with `max_tokens` defaulted and checked against the server limit."""
        n = self.config.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= n <= self.config.max_tokens_limit:
            raise RequestError(
                f"max_tokens={n} is outside 1..{self.config.max_tokens_limit}; ask for fewer tokens "
                "(the limit is the server's --max-tokens-limit).", 400, "invalid_value", "max_tokens",
            )
        return SamplingParams(n, temperature, top_p, seed, tuple(stop))

    def resolve_defenses(self, specs: Sequence[str] | None) -> tuple[str, ...]:
        """Normalised defence specs (the server default for None), each built once and cached."""
        if specs is None:
            return self.default_defenses
        keep = tuple(s.strip() for s in specs if s.strip() and s.strip() != "none")
        with self._defense_lock:
            for spec in keep:
                if spec not in self._defenses:
                    self._defenses[spec] = build_defense(spec, self.loaded)
        return keep

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of the messages rendered with the chat template and the assistant prompt."""
        tok = self.loaded.tokenizer
        if not getattr(tok, "chat_template", None):
            raise RequestError(
                f"Model {self.model_id!r} has no chat template; use /v1/completions or restart the "
                "server with --chat-template FILE.", param="messages",
            )
        with self._tok_lock:
            try:
                text = tok.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
            except jinja2.TemplateError as e:
                raise RequestError(
                    f"The chat template rejected the messages ({e}); fix their roles or order.", param="messages"
                ) from e
            return list(tok(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, prompt: str) -> list[int]:
        with self._tok_lock:
            return list(self.loaded.tokenizer(prompt)["input_ids"])

    def _decode(self, tokens: list[int]) -> str:
        with self._tok_lock:
            return str(self.loaded.tokenizer.decode(tokens, skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False))

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("A prompt tokenised to zero tokens; send some text.", param="prompt")
        if self._max_positions and len(ids) + params.max_tokens > self._max_positions:
            raise RequestError(
                f"The prompt ({len(ids)} tokens) plus max_tokens={params.max_tokens} exceeds the model's "
                f"context of {self._max_positions} tokens; shorten the prompt or lower max_tokens.",
                400, "context_length_exceeded", "max_tokens",
            )

    def _key(self, params: SamplingParams, defenses: tuple[str, ...]) -> tuple[Any, ...]:
        """Jobs with equal keys may share a generate call; a seeded sampling job runs alone."""
        if not params.do_sample:
            return ("greedy", defenses)
        if params.seed is not None:
            return ("seeded", next(self._solo))
        return ("sample", params.temperature, params.top_p, defenses)

    def submit(self, prompts: Sequence[list[int]], params: SamplingParams, defenses: tuple[str, ...],
               stream: bool = False) -> list[Job]:
        """Queue all prompts or none; 503 when the queue lacks room or the server is stopping."""
        for ids in prompts:
            self._check_prompt(ids, params)
        jobs = [Job(list(ids), params, defenses, stream, self._key(params, defenses)) for ids in prompts]
        with self._cond:
            if self._stopping:
                raise RequestError("The server is shutting down; retry the request later.", 503, "shutting_down")
            if len(self._pending) + len(jobs) > self.config.queue_size:
                self._counts["rejected"] += len(jobs)
                raise RequestError(
                    f"The request queue is full ({len(self._pending)} of {self.config.queue_size} waiting); "
                    "retry shortly, or restart the server with a larger --queue-size.", 503, "queue_full",
                )
            self._pending.extend(jobs)
            self._counts["requests"] += len(jobs)
            self._cond.notify_all()
        return jobs

    def start(self) -> None:
        """Start the batching worker (idempotent)."""
        with self._cond:
            if self._worker is not None:
                return
            self._stopping = False
            self._worker = threading.Thread(target=self._run, name="latentguard-batcher", daemon=True)
            self._worker.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.join(timeout)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _next_batch(self) -> list[Job] | None:
        """Wait for work, linger `batch_wait_ms` for company, then take the oldest job's group."""
        limit, wait = self.config.max_batch_size, self.config.batch_wait_ms / 1000
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + wait
            while len(self._pending) < limit and not self._stopping and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            key = self._pending[0].key
            batch = [j for j in self._pending if j.key == key][:limit]
            for job in batch:
                self._pending.remove(job)
            self._running = len(batch)
            return batch

    def _run_batch(self, batch: list[Job]) -> None:
        seqs = [_Sequence(job, self._decode, self._eos) for job in batch]
        try:
            out, width = self._generate(batch, seqs)
            for seq, row in zip(seqs, out[:, width:].tolist()):
                if not seq.done:  # stopped by a limit of the model's own generation config
                    seq.finish(self._decode(row), len(row), "length")
        except Exception as e:  # noqa: BLE001  reported to every client of the batch; the worker keeps serving
            err = GenerationError(f"Generation failed ({type(e).__name__}: {e}); check the server log and retry.")
            for seq in seqs:
                if not seq.done:
                    seq.job.post(err)
        finally:
            with self._cond:
                self._running = 0
                self._counts["batches"] += 1
                self._batch_sizes[len(batch)] += 1

    def _generate(self, batch: list[Job], seqs: list[_Sequence]) -> tuple[Tensor, int]:
        """One left-padded generate call for the batch, inside its defences."""
        model: Any = self.loaded.model  # transformers' stubs type `generate` oddly
        params = batch[0].params
        ids, mask = _left_pad([job.prompt_ids for job in batch], self._pad_id)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
            if params.do_sample else {"do_sample": False}
        )
        defenses = [self._defenses[spec] for spec in batch[0].defenses]
        with torch.no_grad(), apply_defenses(model, defenses):
            if params.do_sample and params.seed is not None:
                torch.manual_seed(params.seed)
            out = model.generate(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                max_new_tokens=max(job.params.max_tokens for job in batch), pad_token_id=self._pad_id,
                stopping_criteria=StoppingCriteriaList([_BatchTracker(seqs, ids.shape[1])]), **sampling,
            )
        return out, ids.shape[1]

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring and tests: batch-size histogram, queue depth, hooks attached now."""
        with self._cond:
            stats: dict[str, Any] = {
                "model": self.model_id, **{k: self._counts[k] for k in ("requests", "rejected", "batches")},
                "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                "largest_batch": max(self._batch_sizes, default=0), "queue_depth": len(self._pending),
                "running": self._running, "max_batch_size": self.config.max_batch_size,
                "queue_size": self.config.queue_size,
            }
        with self._defense_lock:
            stats["defenses_cached"] = sorted(self._defenses)
        stats["hooks_attached"] = count_hooks(self.loaded.model)
        return stats
