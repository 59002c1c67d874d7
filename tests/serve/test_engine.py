"""Engine in-process: the queue bound, grouping by defence, hook removal (also after a failed
batch), streaming deltas and stop strings; the model's own `generate` is the oracle."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from latentguard.hooks import count_hooks
from latentguard.models import LoadedModel
from latentguard.serve import Engine, GenerationError, GenerationResult, RequestError, ServeConfig
from latentguard.serve.engine import _held_back
from tests.serve.conftest import save_direction

HELLO = [{"role": "user", "content": "Hello"}]


def _direct_greedy(loaded: LoadedModel, ids: list[int], max_new_tokens: int) -> str:
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)


async def _stream(engine: Engine, ids: list[int], max_tokens: int, stop: Sequence[str] = ()) -> tuple[str, GenerationResult]:
    (job,) = engine.submit([ids], engine.params(max_tokens, stop=stop), (), stream=True)
    pieces, result = [], None
    async for item in job.events():
        if isinstance(item, str):
            pieces.append(item)
        else:
            result = item
    assert result is not None
    return "".join(pieces), result


def test_queue_is_bounded_all_or_none_and_closed_engine_refuses(tiny_loaded):
    engine = Engine(tiny_loaded, ServeConfig(queue_size=2))  # never started: jobs stay queued

    async def main() -> None:
        ids, params = engine.encode_text("Hello"), engine.params(max_tokens=4)
        with pytest.raises(RequestError, match="queue is full") as err:
            engine.submit([ids] * 3, params, ())
        assert err.value.status == 503 and engine.stats()["queue_depth"] == 0
        engine.submit([ids, ids], params, ())
        with pytest.raises(RequestError, match=r"queue is full \(2 of 2 waiting\)"):
            engine.submit([ids], params, ())
        engine.close()
        with pytest.raises(RequestError, match="shutting down"):
            engine.submit([ids], params, ())

    asyncio.run(main())
    assert engine.stats()["rejected"] == 4


def test_limits_are_checked_before_queueing(tiny_loaded):
    engine = Engine(tiny_loaded, ServeConfig(max_tokens_limit=16, default_max_tokens=8))
    assert engine.params().max_tokens == 8
    with pytest.raises(RequestError, match=r"max_tokens=17 is outside 1\.\.16"):
        engine.params(max_tokens=17)
    with pytest.raises(RequestError, match="not served here") as err:
        engine.check_model("gpt-4")
    assert err.value.status == 404

    async def main() -> None:
        with pytest.raises(RequestError, match="exceeds the model's context of 256 tokens"):
            engine.submit([engine.encode_text("x" * 300)], engine.params(8), ())

    asyncio.run(main())


def test_batches_group_by_defense_and_leave_no_hooks(tiny_loaded, tmp_path: Path):
    spec = f"add:{save_direction(tiny_loaded.info, tmp_path / 'dir', layer=1)},alpha=8"
    engine = Engine(tiny_loaded, ServeConfig(max_batch_size=8))
    ids = engine.encode_chat(HELLO)

    async def main() -> list[GenerationResult]:
        params = engine.params(max_tokens=6)
        jobs = engine.submit([ids] * 3, params, ()) + engine.submit([ids] * 2, params, engine.resolve_defenses([spec]))
        engine.start()  # everything is queued before the worker looks: two groups, in order
        try:
            return [await job.result() for job in jobs]
        finally:
            engine.close()

    results = asyncio.run(main())
    assert engine.stats()["batch_sizes"] == {"3": 1, "2": 1}
    assert count_hooks(tiny_loaded.model) == 0
    plain, steered = {r.text for r in results[:3]}, {r.text for r in results[3:]}
    assert plain == {_direct_greedy(tiny_loaded, ids, 6)}
    assert len(steered) == 1 and steered != plain
    assert all(r.completion_tokens == 6 and r.prompt_tokens == len(ids) for r in results)


def test_failed_batch_removes_hooks_and_the_worker_keeps_serving(tiny_loaded, tmp_path: Path):
    spec = f"add:{save_direction(tiny_loaded.info, tmp_path / 'dir', layer=0)},alpha=2"
    engine = Engine(tiny_loaded, ServeConfig(defense=[spec]))
    assert engine.default_defenses == (spec,)

    async def main() -> GenerationResult:
        engine.start()
        try:
            params = engine.params(max_tokens=4)
            (bad,) = engine.submit([[10**6]], params, engine.default_defenses)  # id past the vocabulary
            with pytest.raises(GenerationError, match="Generation failed .*IndexError"):
                await bad.result()
            assert count_hooks(tiny_loaded.model) == 0
            (good,) = engine.submit([engine.encode_text("Hello")], params, engine.default_defenses)
            return await good.result()
        finally:
            engine.close()

    assert asyncio.run(main()).completion_tokens == 4
    assert count_hooks(tiny_loaded.model) == 0


def test_stream_deltas_concatenate_and_stop_strings_cut(embedded):
    engine = Engine(embedded, ServeConfig())
    ids = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])

    async def main() -> tuple[tuple[str, GenerationResult], tuple[str, GenerationResult]]:
        engine.start()
        try:
            return await _stream(engine, ids, 12), await _stream(engine, ids, 12, stop=[" Paris", "zzz"])
        finally:
            engine.close()

    (full_stream, full), (cut_stream, cut) = asyncio.run(main())
    assert full_stream == full.text == _direct_greedy(embedded, ids, 12)
    assert " Paris" in full.text
    assert cut_stream == cut.text == full.text[: full.text.index(" Paris")]
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens


def test_held_back_covers_stop_prefixes_and_partial_characters():
    assert _held_back("The capital is Pa", [" Paris"]) == 3
    assert _held_back("abc\ufffd", []) == 1
    assert _held_back("The capital", [" Paris"]) == 0


def test_sampling_honours_seed_and_top_p(tiny_loaded):
    engine = Engine(tiny_loaded, ServeConfig())
    ids = engine.encode_text("Hello")

    async def run(**sampling: Any) -> str:
        (job,) = engine.submit([ids], engine.params(max_tokens=8, **sampling), ())
        return (await job.result()).text

    async def main() -> tuple[str, ...]:
        engine.start()
        try:
            return (await run(), await run(temperature=1.0, seed=7), await run(temperature=1.0, seed=7),
                    await run(temperature=1.0, seed=8), await run(temperature=1.0, top_p=1e-6, seed=9))
        finally:
            engine.close()

    greedy, seeded, again, other_seed, nucleus_of_one = asyncio.run(main())
    assert seeded == again and seeded not in (greedy, other_seed)
    assert nucleus_of_one == greedy  # top_p this small keeps only the most likely token
