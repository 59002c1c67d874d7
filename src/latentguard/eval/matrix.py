"""The attack × defence matrix of `latentguard eval --attack a,b --defense x,y` (docs/attacks.md).

Harmful sets run once per (attack, defence column); benign sets (over-refusal, utility) once per
column, without attack. Every generation key holds the attack's and the defences' descriptions,
so a killed matrix run resumes cell by cell, and a plain run's generations are reused by the
`none` row. The judge grades each response against the ORIGINAL request (the record's `prompt`),
on the part of the answer the attack says belongs to it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from latentguard.attacks import Attack, AttackContext, AttackedPrompt, user_turn
from latentguard.defenses import Defense
from latentguard.eval.datasets import Dataset, Record
from latentguard.eval.generation import JsonlStore, generate
from latentguard.eval.runner import (
    EvalConfig,
    RunStores,
    _dataset_rows,
    _judge_stage,
    _run_stages,
    datasets_block,
    summarize,
)
from latentguard.models import LoadedModel

__all__ = ["cell_rate", "defense_label", "pick_rate", "prepare_attacks", "run_matrix"]

Data = dict[str, tuple[Dataset, list[Record]]]


def prepare_attacks(attacks: Sequence[Attack], ctx: AttackContext) -> dict[str, float]:
    """Run each attack's set-up (RADIAL's ranking, cached in OUT/attacks/); seconds per attack label."""
    out = {}
    for a in attacks:
        t0 = time.perf_counter()
        a.prepare(ctx)
        out[a.label] = round(time.perf_counter() - t0, 3)
    return out


def defense_label(defenses: Sequence[Defense]) -> str:
    if not defenses:
        return "none"
    parts = []
    for d in defenses:
        desc = d.describe()
        alpha = desc.get("alpha")
        parts.append(str(desc.get("defense", "?")) + ("" if alpha is None else f"(α={alpha})"))
    return "+".join(parts)


def _unique(labels: list[str]) -> list[str]:
    return [lab if labels.count(lab) == 1 else f"{lab} #{labels[:i].count(lab) + 1}" for i, lab in enumerate(labels)]


def _generate_attacked(cfg: EvalConfig, loaded: LoadedModel, records: list[Record], gens: JsonlStore,
                       defenses: Sequence[Defense], attack: Attack) -> tuple[list[str], dict[str, str | None]]:
    """Keys of the final turn per record, and the text the judge grades for each key."""
    gen_cfg = cfg.generation()
    if attack.changes_prompts:
        items = attack.attack_prompts([r.prompt for r in records])
        messages: list[Any] | None = [i.messages for i in items]
    else:
        items, messages = [AttackedPrompt(user_turn(r.prompt)) for r in records], None
    keys = generate(loaded, records, gen_cfg, gens, defenses, messages=messages, attack=attack)
    if any(i.follow_up for i in items):  # second turn after the model's own first answer
        second = [i.messages + [{"role": "assistant", "content": gens.records[k]["response"]},
                                {"role": "user", "content": i.follow_up}] if i.follow_up else i.messages
                  for i, k in zip(items, keys)]
        keys = generate(loaded, records, gen_cfg, gens, defenses, messages=second, attack=attack)
    texts = {k: attack.judged_response(i, gens.records[k]["response"], follow_up=bool(i.follow_up))
             for i, k in zip(items, keys)}
    return keys, texts


def _attack_cell(cfg: EvalConfig, loaded: LoadedModel, defenses: Sequence[Defense], attack: Attack,
                 judges: dict[str, dict[str, Any]], data: Data, stores: RunStores) -> dict[str, list[dict[str, Any]]]:
    """Per-prompt rows of every harmful set under one attack and one defence column."""
    if attack.family == "none":  # exactly the unattacked path: its keys are a plain run's keys
        return _run_stages(cfg, loaded, defenses, judges, data, stores)[0]
    results = {}
    for name, (d, recs) in data.items():
        keys, texts = _generate_attacked(cfg, loaded, recs, stores.gens, defenses, attack)
        jkeys = _judge_stage(judges[d.role], stores.gens, keys, stores.judgements, texts=texts)
        results[name] = _dataset_rows(stores.gens, stores.judgements, recs, keys, jkeys)
    return results


def pick_rate(entry: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """One data set's headline rate (summary.json `datasets` entry) and the judge it came from.

    The keyword judge's rate if present, else the first judge with one: harmful sets' ASR, over-refusal
    sets' over-refusal rate (refusal block), then a harm-rubric judge's share of scores >= 4.
    """
    judges = entry.get("judges", {})
    for name in ["keyword", *judges]:
        j = judges.get(name, {})
        for block, key in (("refusal", "asr"), ("refusal", "overrefusal_rate"), ("harm", "rate_ge4")):
            if key in j.get(block, {}):
                return j[block][key], name
    return None, None


def cell_rate(datasets: dict[str, Any], role: str) -> dict[str, Any]:
    """One number per cell: the rate of the single data set of `role`, or the mean over several (no CI)."""
    picked: list[tuple[str, dict[str, Any], str]] = []
    for n, e in datasets.items():
        r, j = pick_rate(e)
        if e["role"] == role and r is not None and j is not None and r.get("value") is not None:
            picked.append((n, r, j))
    if not picked:
        return {"value": None, "ci95": None, "n": 0, "judge": None, "datasets": []}
    if len(picked) == 1:
        n, r, j = picked[0]
        return {**r, "judge": j, "datasets": [n]}
    vals = [r["value"] for _, r, _ in picked]
    return {"value": sum(vals) / len(vals), "ci95": None, "n": sum(r["n"] for _, r, _ in picked),
            "judge": picked[0][2], "datasets": [n for n, _, _ in picked]}


def run_matrix(cfg: EvalConfig, loaded: LoadedModel, columns: Sequence[Sequence[Defense]], attacks: Sequence[Attack],
               judges: dict[str, dict[str, Any]], data: Data, stores: RunStores,
               meta: dict[str, Any]) -> dict[str, Any]:
    """Run every cell and return summary.json: top-level `datasets` = the first attack × first column."""
    from latentguard.attacks import NoAttack

    attacks = list(attacks) or [NoAttack()]
    harmful = {n: v for n, v in data.items() if v[0].role == "harmful"}
    benign = {n: v for n, v in data.items() if v[0].role != "harmful"}
    sets = {n: d for n, (d, _) in data.items()}
    cols, rows = _unique([defense_label(c) for c in columns]), _unique([a.label for a in attacks])
    harm_cells: dict[str, dict[str, Any]] = {r: {} for r in rows}
    benign_cells: dict[str, Any] = {}
    for col, defenses in zip(cols, columns):
        if benign:
            res, nll = _run_stages(cfg, loaded, defenses, judges, benign, stores)
            benign_cells[col] = {"datasets": datasets_block(sets, res, nll)}
        for row, attack in zip(rows, attacks):
            if harmful:
                res = _attack_cell(cfg, loaded, defenses, attack, judges, harmful, stores)
                harm_cells[row][col] = {"datasets": datasets_block(sets, res, {})}
    summary = summarize(meta, sets, {}, {})
    first = {**harm_cells[rows[0]].get(cols[0], {}).get("datasets", {}), **benign_cells.get(cols[0], {}).get("datasets", {})}
    summary["datasets"] = {n: first[n] for n in data if n in first}
    summary["matrix"] = {
        "attacks": [{"label": r, "spec": a.spec, **a.describe()} for r, a in zip(rows, attacks)],
        "defenses": [{"label": c, "specs": s, "describe": [d.describe() for d in ds]}
                     for c, s, ds in zip(cols, cfg.defense_columns(), columns)],
        "harmful_rate": {r: {c: cell_rate(harm_cells[r][c]["datasets"], "harmful") for c in harm_cells[r]} for r in rows},
        "overrefusal": {c: cell_rate(b["datasets"], "overrefusal") for c, b in benign_cells.items()},
        "cells": {"harmful": harm_cells, "benign": benign_cells},
    }
    return summary
