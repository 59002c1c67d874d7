"""Batched, resumable generation: one JSONL record per prompt, flushed and fsync'd as it is made.

Each record's `key` hashes the model fingerprint, the defence descriptions, the chat-formatted
prompt and the generation settings, so a rerun skips what is done and never mixes settings.
A last line cut short by a kill is repaired (truncated, with a warning); a bad line anywhere
else is an error naming the line.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig

from latentguard.attacks import Attack
from latentguard.defenses import Defense, apply_defenses
from latentguard.errors import ConfigError, DataError, OutputExistsError
from latentguard.eval.datasets import Record
from latentguard.models import LoadedModel, format_chats
from latentguard.models.chat import Message

__all__ = ["GENERATIONS_FILE", "GenerationConfig", "JsonlStore", "generate", "open_generations", "record_key"]

GENERATIONS_FILE = "generations.jsonl"
log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=256, metadata={"help": "new tokens per response"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 = greedy (default)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (with --temperature > 0)"})
    seed: int = field(default=0, metadata={"help": "seed for --limit sampling and for sampled decoding"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward batch (left-padded)"})
    system: str | None = field(default=None, metadata={"help": "system prompt; default: the chat template's own"})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}; use >= 1.")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature={self.temperature}; use >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}; use a value in (0, 1].")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}; use >= 1.")

    def settings(self) -> dict[str, Any]:
        """What determines a response (batch size does not, up to float rounding)."""
        s = asdict(self)
        s.pop("batch_size")
        s["do_sample"] = self.temperature > 0
        return s


def record_key(fingerprint: str, defenses: Sequence[dict[str, Any]], prompt: str, settings: dict[str, Any],
               attack: dict[str, Any] | None = None) -> str:
    """sha256 of (model fingerprint, defence descriptions, formatted prompt, settings[, attack description]).

    Without an attack the payload (and so every key of an unattacked run) is what it always was.
    """
    payload: dict[str, Any] = {"model": fingerprint, "defenses": list(defenses), "prompt": prompt, "settings": settings}
    if attack is not None:
        payload["attack"] = attack
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JsonlStore:
    """Append-only JSONL of records with a `key`; each append is flushed and fsync'd."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for i, raw in enumerate(lines, 1):
            last = i == len(lines) or (i == len(lines) - 1 and lines[-1] == b"")
            try:
                rec = json.loads(raw) if raw.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if not last:
                    raise DataError(f"{self.path} line {i} is corrupt ({e}); delete that line or rerun with --overwrite.") from e
                log.warning("%s line %d was cut short (killed mid-write); dropped it and will redo it.", self.path, i)
                with self.path.open("r+b") as f:
                    f.truncate(offset)
                return
            if rec is not None:
                if not isinstance(rec, dict) or "key" not in rec:
                    raise DataError(f"{self.path} line {i} is not a keyed record; delete that line or rerun with --overwrite.")
                self.records[rec["key"]] = rec
            offset += len(raw) + 1
        if data and not data.endswith(b"\n"):  # complete last record, newline lost: restore it
            with self.path.open("ab") as f:
                f.write(b"\n")

    def __contains__(self, key: object) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record


def open_generations(out: str | os.PathLike[str], loaded: LoadedModel) -> JsonlStore:
    """`out/generations.jsonl`, refusing one that holds another model's records."""
    store = JsonlStore(Path(out) / GENERATIONS_FILE)
    fp = loaded.info.fingerprint
    for rec in store.records.values():
        other = rec.get("model", {})
        if other.get("fingerprint") != fp:
            raise OutputExistsError(
                f"{store.path} holds generations of model {other.get('model_id')!r} (fingerprint "
                f"{other.get('fingerprint')}), not {loaded.info.model_id!r} ({fp}); pass --overwrite or another --out."
            )
    return store


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _hf_config(loaded: LoadedModel, cfg: GenerationConfig) -> HFGenerationConfig:
    tok = loaded.tokenizer
    sample = cfg.temperature > 0
    return HFGenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        temperature=cfg.temperature if sample else None,
        top_p=cfg.top_p if sample else None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=loaded.model.generation_config.eos_token_id or tok.eos_token_id,
    )


@torch.no_grad()
def _generate_batch(
    loaded: LoadedModel, texts: Sequence[str], hf_cfg: HFGenerationConfig, seed: int
) -> list[tuple[str, int, bool]]:
    """(response, new tokens up to and including the stop token, stopped) per prompt."""
    tok = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = loaded.model.generate(**enc, generation_config=hf_cfg)  # type: ignore[operator]
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    eos = hf_cfg.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for ids in new.tolist():
        cut = next((i for i, t in enumerate(ids) if t in stop_ids), None)
        kept = ids if cut is None else ids[: cut + 1]
        rows.append((str(tok.decode(kept, skip_special_tokens=True)), len(kept), cut is not None))
    return rows


def _record(key: str, rec: Record, prompt: str, row: tuple[str, int, bool], meta: dict[str, Any],
            messages: list[Message] | None = None) -> dict[str, Any]:
    text, n_new, stopped = row
    sent = {} if messages is None else {"messages": messages}
    return {
        "key": key, "dataset": rec.source, "id": rec.id, "category": rec.category,
        "prompt": rec.prompt, "formatted_prompt": prompt, **sent, "response": text,
        "n_new_tokens": n_new, "finish_reason": "stop" if stopped else "length",
        "extra": rec.extra, **meta,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def generate(
    loaded: LoadedModel,
    records: Sequence[Record],
    cfg: GenerationConfig,
    store: JsonlStore,
    defenses: Sequence[Defense] = (),
    progress: bool = True,
    messages: Sequence[list[Message]] | None = None,
    attack: Attack | None = None,
) -> list[str]:
    """Generate a response for every record not yet in `store`; return every record's key, in order.

    Prompts are chat-formatted, left-padded and batched; defences wrap each batch. Sampled
    decoding is seeded per batch, so it repeats only for the same batch composition.

    Args:
        messages: per record, the conversation to send instead of the record's prompt (an
            attacked prompt); the record keeps the original request as `prompt`.
        attack: the attack that built `messages` and/or transforms the model while it generates
            (entered outside the defences); its description joins each key and record.
    """
    described = [d.describe() for d in defenses]
    settings = cfg.settings()
    chats = list(messages) if messages is not None else [[{"role": "user", "content": r.prompt}] for r in records]
    prompts = format_chats(loaded.tokenizer, chats, cfg.system)
    attack_desc = attack.describe() if attack is not None else None
    keys = [record_key(loaded.info.fingerprint, described, p, settings, attack_desc) for p in prompts]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}  # a repeated prompt runs once
    todo = [i for i, k in enumerate(keys) if k not in store and first[k] == i]
    meta = {"model": {"model_id": loaded.info.model_id, "fingerprint": loaded.info.fingerprint},
            "defenses": described, "settings": settings, **({"attack": attack_desc} if attack_desc else {})}
    transform = attack.apply if attack is not None else (lambda _m: contextlib.nullcontext())
    hf_cfg = _hf_config(loaded, cfg)
    name = records[0].source if records else ""
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc=f"generate {name}", unit="prompt", disable=not progress)
    n_tokens, t0 = 0, time.perf_counter()
    for batch in _batches(todo, cfg.batch_size):
        seed = cfg.seed ^ int(keys[batch[0]][:8], 16)
        with transform(loaded.model), apply_defenses(loaded.model, defenses):
            rows = _generate_batch(loaded, [prompts[i] for i in batch], hf_cfg, seed)
        for i, row in zip(batch, rows):
            store.append(_record(keys[i], records[i], prompts[i], row, meta, chats[i] if messages is not None else None))
        n_tokens += sum(r[1] for r in rows)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.1f}")
    bar.close()
    return keys
