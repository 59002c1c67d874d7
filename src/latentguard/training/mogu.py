"""The MoGU stage driver behind `latentguard train --method mogu|mogu2` (see `methods/mogu.py`).

Run directory (`--out`):
```
meta.json       kind mogu_run: version, model fingerprint, config
data/           glad.jsonl unwill.jsonl router.jsonl val.json manifest.json (mogu_data.py)
layers.json     routed layers (v2: probe accuracy per layer, from --mogu-scan or scored here)
glad/ unwill/   train() runs of the experts (PEFT LoRA on the out-projection), a checkpoint per epoch
selection.json  the checkpoint kept per expert (validation compliance / refusal)
init/           MoGU artefact: the chosen experts + freshly initialised routers
router/         train() run of the routers (--lora none: checkpoints hold the routers alone)
mogu/           the MoGU artefact: `--defense mogu:OUT` (or mogu:OUT/mogu)
summary.json    parameter counts, layers, stage timings
```
Every stage is skipped when its output exists and resumed from its last checkpoint when cut off,
so `--resume` continues a killed run. v2 IFT mode (`--mogu-from RUN --data TASK`): a LoRA
fine-tune of the MoGU_v2 model on TASK with the wrappers in place; `--mogu-mix ρ` adds that share
of router rows with their gate targets (task rows y = 0) and trains the routers too (mogu.md R5);
the fine-tune is merged to `model/` and the artefact re-stamped for it in `mogu/`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from latentguard import __version__
from latentguard.artifacts import git_commit, staged_dir, write_json
from latentguard.defenses.mogu import (
    MoGUModules,
    MoGUState,
    attach_mogu,
    experts_from_peft,
    gate_params,
    load_mogu,
    mogu_site,
)
from latentguard.directions import ScanConfig, scan_model
from latentguard.errors import ArtifactError, ConfigError, OutputExistsError
from latentguard.models import LoadedModel, arch_of, load_model, normalize_layer
from latentguard.training import reference_data as rd
from latentguard.training.data import load_spec, parse_data_spec
from latentguard.training.merge import MERGED_META, merge_run
from latentguard.training.methods.mogu import MoGU2Config, MoGUConfig
from latentguard.training.mixing import per_epoch_count
from latentguard.training.mogu_data import (
    MoGUDataConfig,
    build_mogu_data,
    read_jsonl,
    write_mogu_data,
)
from latentguard.training.reference import greedy
from latentguard.training.run import TrainResult, train
from latentguard.training.trainer import MODULES_FILE

__all__ = ["RUN_KIND", "run_mogu", "select_layers"]

RUN_KIND = "mogu_run"
Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _defaults(cfg: MoGUConfig, version: str) -> tuple[str, str]:
    """(gate, gate-loss positions): v1 is faithful (v1 gate, all positions), v2 our reconstruction's choice."""
    v1 = version == "mogu"
    return cfg.mogu_gate or ("v1" if v1 else "linear"), cfg.mogu_gate_positions or ("all" if v1 else "from_instruction")


def _prepare_top(cfg: MoGUConfig, version: str, loaded: LoadedModel) -> Path:
    out = Path(str(cfg.output_dir))
    if out.is_dir() and any(out.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(out)
        elif not cfg.resume:
            raise OutputExistsError(f"Output {out} already exists; pass --resume to continue its stages, --overwrite, or another --out.")
        else:
            meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
            if meta.get("model", {}).get("fingerprint") not in (None, loaded.info.fingerprint) or meta.get("version") not in (None, version):
                raise ArtifactError(f"{out} holds a {meta.get('version')} run on {meta.get('model', {}).get('model_id')!r}; "
                                    f"resume it with the same --method and --model, or pick another --out.")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "meta.json").is_file():
        write_json(out / "meta.json", {
            "kind": RUN_KIND, "defense": "mogu", "version": version, "latentguard_version": __version__, "latentguard_commit": git_commit(),
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "model_spec": cfg.model,
            "model": loaded.info.as_meta(),
            "config": {k: v for k, v in cfg.to_dict().items() if isinstance(v, (str, int, float, bool, list, type(None)))},
        })
    return out


def _stage_cfg(cfg: MoGUConfig, run_dir: Path, method: str, **kw: Any) -> MoGUConfig:
    """A stage's train() config: the driver's mogu_* and common fields, constant lr, a checkpoint per epoch."""
    mogu = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MoGUConfig) if f.name.startswith("mogu_")}
    common = {k: getattr(cfg, k) for k in ("model", "seed", "data_dir", "bf16", "report_to", "plot", "max_length")}
    resume = run_dir.is_dir() and get_last_checkpoint(str(run_dir)) is not None
    fixed = {"lr_scheduler_type": "constant", "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "epoch",
             "save_total_limit": None}
    return MoGUConfig(output_dir=str(run_dir), method=method, resume=resume, overwrite=not resume,
                      **{**mogu, **common, **fixed, **kw})


def _timed(out: Path, name: str, fn: Callable[[], Any]) -> Any:
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    t0 = time.perf_counter()
    result = fn()
    summary.setdefault("stages_wall_s", {})[name] = round(time.perf_counter() - t0 + summary.get("stages_wall_s", {}).get(name, 0), 1)
    write_json(path, summary)
    return result


# ---------------------------------------------------------------- stages


def _data_stage(cfg: MoGUConfig, out: Path, loaded: LoadedModel, log: Log) -> None:
    if (out / "data" / "manifest.json").is_file():
        return
    if cfg.data_dir is None:
        raise ConfigError("MoGU builds its data from the shared data folder; set LATENTGUARD_SHARED_DATA or --data-dir.")
    dcfg = MoGUDataConfig(n_harmful=cfg.mogu_n_harmful, n_benign=cfg.mogu_n_benign, answer_tokens=cfg.mogu_answer_tokens,
                          response_tokens=cfg.mogu_response_tokens, n_val=cfg.mogu_n_val, seed=cfg.seed,
                          n_borderline=cfg.mogu_n_borderline)
    write_mogu_data(out / "data", build_mogu_data(loaded, Path(cfg.data_dir), dcfg, log))


def select_layers(cfg: MoGU2Config, loaded: LoadedModel, harmful: list[str], benign: list[str]) -> dict[str, Any]:
    """v2 routed layers (mogu.md R1-R2): given, or the top-k by held-out probe accuracy (ties: separation)."""
    n = loaded.info.n_layers
    if cfg.mogu_layers:
        return {"layers": sorted({normalize_layer(int(x), n) for x in cfg.mogu_layers.split(",") if x.strip()}), "source": "given"}
    k = cfg.mogu_top_k or max(2, math.ceil(n / 4))
    if k > n:
        raise ConfigError(f"mogu_top_k={k} but the model has {n} layers; use 1..{n}.")
    if cfg.mogu_scan:
        path = Path(cfg.mogu_scan)
        scan = json.loads((path / "scan.json" if path.is_dir() else path).read_text())
        if scan.get("model", {}).get("fingerprint") != loaded.info.fingerprint:
            raise ArtifactError(f"{path} scanned {scan.get('model', {}).get('model_id')!r}, not this model; scan this model "
                                "(latentguard scan --model ...) or drop --mogu-scan.")
        rows, source = scan["layers"], str(path)
    else:
        m = min(cfg.mogu_scan_n, len(harmful), len(benign))
        rows = scan_model(loaded, harmful[:m], benign[:m], ScanConfig(n=m, seed=cfg.seed)).summary["layers"]
        source = f"scored here: {m} + {m} training prompts, held-out probe accuracy at resid_pre, last prompt token"
    ranked = sorted(rows, key=lambda r: (-r["probe_test_acc"], -r["separation"], r["layer"]))
    return {"layers": sorted(r["layer"] for r in ranked[:k]), "source": source, "top_k": k,
            "probe_test_acc": [r["probe_test_acc"] for r in rows]}


def _layers_stage(cfg: MoGUConfig, version: str, out: Path, loaded: LoadedModel) -> list[int]:
    path = out / "layers.json"
    if not path.is_file():
        if version == "mogu":
            chosen: dict[str, Any] = {"layers": list(range(loaded.info.n_layers)), "source": "every layer (v1)"}
        else:
            glad, unwill = read_jsonl(out / "data/glad.jsonl"), read_jsonl(out / "data/unwill.jsonl")
            chosen = select_layers(cfg, loaded, [r["prompt"] for r in glad], [r["prompt"] for r in unwill])  # type: ignore[arg-type]
        write_json(path, chosen)
    return list(json.loads(path.read_text())["layers"])


def _expert_targets(loaded: LoadedModel, layers: list[int]) -> str:
    """The LoRA targets: the site on every layer, or each chosen layer's out-projection by full name."""
    model = loaded.model
    if layers == list(range(loaded.info.n_layers)):
        return mogu_site(model)
    names = {id(m): n for n, m in model.named_modules()}
    return ",".join(names[id(arch_of(model).o_proj_module(model, l))] for l in layers)


def _expert_stage(cfg: MoGUConfig, out: Path, which: str, loaded: LoadedModel, layers: list[int]) -> None:
    run_dir = out / which
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return
    train(_stage_cfg(
        cfg, run_dir, "mogu_expert", data=[str(out / "data" / f"{which}.jsonl")],
        lora=f"{cfg.mogu_expert_lora},targets={_expert_targets(loaded, layers)}", learning_rate=cfg.mogu_expert_lr,
        num_train_epochs=cfg.mogu_expert_epochs, per_device_train_batch_size=cfg.mogu_expert_batch,
        gradient_accumulation_steps=1,
    ))


def _score_expert(loaded: LoadedModel, adapter: Path, which: str, layers: list[int], prompts: list[str], tokens: int) -> float:
    """Glad: share of harmful validation prompts answered without refusal; Unwill: share of benign ones refused."""
    experts = experts_from_peft(adapter, loaded.model, layers)
    rank = next(iter(experts.values()))[0].shape[0]
    mods = MoGUModules.for_model(loaded.model, layers, rank=rank, gate="linear")
    for l, (a, b, s) in experts.items():
        mods.layer(l).set_expert(which, a, b, s)
    with attach_mogu(loaded.model, mods, MoGUState(mode=which)):
        refused = [rd.is_refusal(g) for g in greedy(loaded, prompts, tokens)]
    share = sum(refused) / len(refused)
    return share if which == "unwill" else 1 - share


def _select_stage(cfg: MoGUConfig, out: Path, which: str, loaded: LoadedModel, layers: list[int], log: Log) -> Path:
    path = out / "selection.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    if which not in state:
        run_dir = out / which
        ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if (p / "adapter_model.safetensors").is_file()),
                       key=lambda p: int(p.name.split("-")[1]))
        entry: dict[str, Any] = {"chosen": str(run_dir / "adapter"), "rule": "final adapter"}
        if cfg.mogu_select and len(ckpts) > 1:
            prompts = json.loads((out / "data" / "val.json").read_text())["harmful" if which == "glad" else "benign"]
            scores = {p.name: _score_expert(loaded, p, which, layers, prompts, cfg.mogu_response_tokens) for p in ckpts}
            best = max(ckpts, key=lambda p: (scores[p.name], -int(p.name.split("-")[1])))  # ties: the earliest
            rule = "max harmful-val compliance" if which == "glad" else "max benign-val refusal"
            entry = {"chosen": str(best), "rule": rule, "scores": scores, "n_val": len(prompts)}
            log(f"[mogu] {which}: {rule} {scores} -> {best.name}")
        state[which] = entry
        write_json(path, state)
    return Path(state[which]["chosen"])


def _init_stage(cfg: MoGUConfig, version: str, out: Path, loaded: LoadedModel, layers: list[int],
                experts: dict[str, Path]) -> None:
    if (out / "init" / "meta.json").is_file():
        return
    gate, _ = _defaults(cfg, version)
    torch.manual_seed(cfg.seed)
    pieces = {w: experts_from_peft(p, loaded.model, layers) for w, p in experts.items()}
    rank = next(iter(pieces["glad"].values()))[0].shape[0]
    mods = MoGUModules.for_model(loaded.model, layers, rank=rank, gate=gate, bottleneck=cfg.mogu_bottleneck,
                                 gate_hidden=cfg.mogu_gate_hidden)
    for which, per_layer in pieces.items():
        for l, (a, b, s) in per_layer.items():
            mods.layer(l).set_expert(which, a, b, s)
    with staged_dir(out / "init", overwrite=True) as tmp:
        mods.to_artifact({"method": version, "k": cfg.mogu_k, "stage": "init",
                          "experts": {w: str(p) for w, p in experts.items()}}).save(tmp, model=loaded.info)


def _router_stage(cfg: MoGUConfig, version: str, out: Path) -> TrainResult | None:
    if (out / "router" / "adapter" / MODULES_FILE).is_file():
        return None
    _, positions = _defaults(cfg, version)
    co_train = version == "mogu2" and getattr(cfg, "mogu_backbone", "none") == "expert_loras"
    return train(_stage_cfg(
        cfg, out / "router", "mogu_router", data=[str(out / "data" / "router.jsonl")], lora="none",
        mogu_init=str(out / "init"), mogu_train="routers+experts" if co_train else "routers",
        mogu_gate_positions=positions, learning_rate=cfg.mogu_router_lr, num_train_epochs=cfg.mogu_router_epochs,
        per_device_train_batch_size=cfg.mogu_router_batch, gradient_accumulation_steps=cfg.mogu_router_accum,
    ))


def _trained_modules(init: Path, modules_file: Path, info: Any) -> MoGUModules:
    """The init artefact with the trained part (routers, or routers + experts) loaded from a run's modules file."""
    mods, _ = load_mogu(init, info)
    state = {}
    for key, value in load_file(str(modules_file)).items():
        head, _, rest = key.partition(".")
        if head == "mogu_routers":
            layer, _, sub = rest.partition(".")
            state[f"layers.{layer}.router.{sub}"] = value
        elif head == "mogu":
            state[rest] = value
    missing = set(state) - set(mods.state_dict())
    if not state or missing:
        raise ArtifactError(f"{modules_file} does not hold MoGU routers matching {init} ({sorted(missing)[:2]}); rerun the stage.")
    mods.load_state_dict(state, strict=False)
    return mods


def _export(cfg: MoGUConfig, version: str, out: Path, loaded: LoadedModel, layers: list[int]) -> Path:
    mods = _trained_modules(out / "init", out / "router" / "adapter" / MODULES_FILE, loaded.info)
    gate, positions = _defaults(cfg, version)
    counts = mods.counts()
    spec_v1_router = 2 * loaded.info.n_layers * gate_params(mods.layout["d_in"], "v1", 512)  # two v1 gates per layer
    co_train = version == "mogu2" and getattr(cfg, "mogu_backbone", "none") == "expert_loras"
    meta = {
        "method": version, "k": cfg.mogu_k, "gate_positions": positions, "lambda": cfg.mogu_lambda,
        "expert_loss": cfg.mogu_loss, "co_trained": "experts" if co_train else "none",
        "trainable": {**counts, "total": counts["router"] + counts["experts"], "spec_v1_router": spec_v1_router},
        "layers_from": json.loads((out / "layers.json").read_text()).get("source"),
        "selection": json.loads((out / "selection.json").read_text()),
        "data": json.loads((out / "data" / "manifest.json").read_text())["sha256"],
    }
    with staged_dir(out / "mogu", overwrite=True) as tmp:
        mods.to_artifact(meta).save(tmp, model=loaded.info)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    summary.update({"version": version, "layers": layers, "gate": gate, "params": meta["trainable"]})
    write_json(out / "summary.json", summary)
    return out / "mogu"


def run_mogu(cfg: MoGUConfig, version: str, log: Log = _log) -> TrainResult:
    """Every MoGU stage in order (skipping finished ones); returns the router run's result and the artefact path."""
    if "targets=" in cfg.mogu_expert_lora:
        raise ConfigError("--mogu-expert-lora sets r, alpha and dropout only; MoGU targets the out-projection itself.")
    if isinstance(cfg, MoGU2Config) and cfg.mogu_from:
        return _run_ift(cfg, log)
    loaded = load_model(cfg.model)
    if isinstance(cfg, MoGU2Config) and cfg.mogu_layers:  # a bad layer list fails before any work
        select_layers(cfg, loaded, [], [])
    out = _prepare_top(cfg, version, loaded)
    _timed(out, "data", lambda: _data_stage(cfg, out, loaded, log))
    layers = _timed(out, "layers", lambda: _layers_stage(cfg, version, out, loaded))
    log(f"[mogu] {version}: routed layers {layers}")
    experts: dict[str, Path] = {}
    for which in ("glad", "unwill"):
        _timed(out, which, partial(_expert_stage, cfg, out, which, loaded, layers))
        experts[which] = _timed(out, f"select_{which}", partial(_select_stage, cfg, out, which, loaded, layers, log))
    _init_stage(cfg, version, out, loaded, layers, experts)
    result = _timed(out, "router", lambda: _router_stage(cfg, version, out))
    art = _export(cfg, version, out, loaded, layers)
    log(f"[mogu] wrote {art} (use --defense mogu:{art})")
    return TrainResult(out=out, trainer=result.trainer if result else None, metrics=result.metrics if result else {},
                       artifact=art)


# ---------------------------------------------------------------- v2: IFT and data-mix restore


def _task_rows_per_epoch(cfg: MoGUConfig) -> int:
    total = 0
    for d in cfg.data:
        spec = parse_data_spec(d)
        total += per_epoch_count(spec.weight, len(load_spec(spec, cfg.data_dir, cfg.prompt_column, cfg.response_column)))
    return total


def _run_ift(cfg: MoGU2Config, log: Log) -> TrainResult:
    """Fine-tune a MoGU_v2 model on --data (LoRA, wrappers in place); with --mogu-mix ρ > 0, the data-mix restore."""
    src = Path(str(cfg.mogu_from))
    art_dir, rows = src / "mogu", src / "data" / "router.jsonl"
    if not (art_dir / "meta.json").is_file() or not rows.is_file():
        raise ArtifactError(f"{src} is not a finished `train --method mogu2` run (needs mogu/ and data/router.jsonl).")
    if not cfg.data:
        raise ConfigError("IFT mode needs the task data: --data NAME_OR_FILE[:weight] (e.g. gsm8k-train:160).")
    loaded = load_model(cfg.model)
    src_mods, src_art = load_mogu(art_dir, loaded.info)
    out = _prepare_top(cfg, "mogu2", loaded)
    data, mix = list(cfg.data), cfg.mogu_mix
    n_task = _task_rows_per_epoch(cfg)
    n_mix = max(1, round(mix / (1 - mix) * n_task)) if mix > 0 else 0
    if n_mix:
        data.append(f"{rows}:{n_mix}")
    trained = "routers+experts" if src_art.meta.get("co_trained") == "experts" else "routers"
    run_dir = out / "ift"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        log(f"[mogu] IFT on {cfg.data} ({n_task} rows/epoch) + {n_mix} router rows (mix {mix})")
        train(_stage_cfg(
            cfg, run_dir, "mogu_router", data=data, lora=cfg.lora, learning_rate=cfg.learning_rate,
            num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, mogu_init=str(art_dir), mogu_eos=True,
            mogu_train=trained if n_mix else "none", mogu_lambda=cfg.mogu_lambda if n_mix else 0.0,
            mogu_gate_positions=_defaults(cfg, "mogu2")[1],
        ))
    if not (out / "model" / MERGED_META).is_file():
        merge_run(run_dir, out / "model", overwrite=True)
    tuned = load_model(str(out / "model"))
    mods = _trained_modules(art_dir, run_dir / "adapter" / MODULES_FILE, loaded.info) if n_mix else src_mods
    meta = {**{k: v for k, v in src_art.meta.items() if k in ("method", "k", "gate_positions", "lambda", "co_trained", "trainable")},
            "derived_from": str(art_dir.resolve()), "ift": {"data": cfg.data, "mix": mix, "router_rows": n_mix,
                                                             "routers_retrained": bool(n_mix)}}
    with staged_dir(out / "mogu", overwrite=True) as tmp:
        mods.to_artifact(meta).save(tmp, model=tuned.info)
    log(f"[mogu] wrote {out / 'model'} and {out / 'mogu'} (eval: --model {out / 'model'} --defense mogu:{out / 'mogu'})")
    return TrainResult(out=out, trainer=None, metrics={}, artifact=out / "mogu")
