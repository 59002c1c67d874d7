"""latentguard against peer libraries, in one run on one machine: steering speed and capture speed.

Steering: one diff-in-means refusal direction r (as bench_steer: layer --layer, 16 + 16 train
prompts) added as alpha * r to the residual stream entering block L, at every position:
latentguard's `add` defence (a pre-hook on block L), `steering-vectors` (SteeringVector on
decoder block L-1's output) and `repeng` (ControlModel on layer L-1, set_raw_control). That is
the same tensor at the same point of the network, so greedy outputs must be equal token for token.
Greedy generate with exactly --new-tokens tokens per row, interleaved rounds with a plain and a
plain-control run; wall and process CPU time. Each peer attaches per call, as latentguard does.
Capture: last-token block outputs of every layer (bench_taps' setting), latentguard `capture` vs
an nnsight trace that saves the same tensors (nnsight wraps a copy of the model: it replaces the
modules' forward methods). Values must agree exactly.

Peers are benchmark-only. nnsight installs from the `peers` extra. steering-vectors (declares
transformers<5) and repeng (declares numpy<2) would downgrade latentguard's dependencies, so this
script installs them with --no-deps into benchmarks/.peers (unless --no-install) and runs them on
this environment's versions; whatever does not install or import is reported under "peers" with
the reason, and its rows are absent rather than invented.
Prints the ratios and writes benchmarks/results/bench_peers.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_peers.py [--rounds 10] [--batch 8] [--new-tokens 32]
     [--device cuda] [--model-config llama3-8b] [--no-install]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    add_model_args,
    bench_model,
    interleaved,
    model_settings,
    ratio,
    result_name,
    write_result,
)
from bench_steer import _cpu_timed, _direction

from latentguard.artifacts import Artifact
from latentguard.defenses import apply_defenses, build_defense
from latentguard.eval.datasets import read_prompts, shared_data_dir
from latentguard.hooks import capture, encode_batch
from latentguard.models import format_prompts

PEERS_DIR = Path(__file__).parent / ".peers"
NO_DEPS_PEERS = {"steering-vectors": "0.12.2", "repeng": "0.4.0"}  # pinned: the versions measured


def _install(no_install: bool) -> dict[str, str]:
    """pip install --no-deps the conflicting peers into PEERS_DIR; {peer: problem} for failures."""
    missing = [p for p in NO_DEPS_PEERS if not any(PEERS_DIR.glob(f"{p.replace('-', '_')}-*.dist-info"))]
    if not missing or no_install:
        return {p: "not installed (--no-install)" for p in missing}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--target", str(PEERS_DIR), *[f"{p}=={NO_DEPS_PEERS[p]}" for p in missing]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        return {p: f"pip install --no-deps failed: {why}" for p in missing}
    return {}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_peers(problems: dict[str, str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """({peer: module}, {peer: report}); a peer that fails to import is reported, not raised."""
    if PEERS_DIR.is_dir():
        sys.path.append(str(PEERS_DIR))
    mods: dict[str, Any] = {}
    report: dict[str, dict[str, Any]] = {}
    notes = {"steering-vectors": "installed --no-deps: declares transformers<5.0, run on transformers "
                                 + _version("transformers")}
    for peer, loader in (("steering-vectors", _load_steering_vectors), ("repeng", _load_repeng), ("nnsight", _load_nnsight)):
        entry: dict[str, Any] = {"version": _version(peer)}
        if peer in problems:
            entry.update(status="skipped", reason=problems[peer])
        else:
            try:
                mods[peer], note = loader()
                entry.update(status="ran", note=" ".join(x for x in (notes.get(peer), note) if x) or None)
            except Exception as e:  # noqa: BLE001
                # any failure to import is the peer's: reported, and its rows are left out
                entry.update(status="skipped", reason=f"import failed: {type(e).__name__}: {e}"[:300])
        report[peer] = entry
    return mods, report


def _load_steering_vectors() -> tuple[Any, str | None]:
    return importlib.import_module("steering_vectors"), None


def _load_repeng() -> tuple[Any, str | None]:
    """repeng's package __init__ imports extract.py, whose `np.float_` annotation fails on numpy 2
    (repeng declares numpy<2); the steering code (control.py) is then loaded on its own."""
    try:
        return importlib.import_module("repeng.control"), None
    except AttributeError as e:
        if "float_" not in str(e):
            raise
    spec = importlib.util.find_spec("repeng")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("repeng")
    path = Path(next(iter(spec.submodule_search_locations))) / "control.py"
    mod_spec = importlib.util.spec_from_file_location("repeng_control", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    import numpy as np

    return mod, (f"installed --no-deps: declares numpy<2; `import repeng` fails on numpy {np.__version__} "
                 "(np.float_ in extract.py), so repeng/control.py (ControlModel) is loaded alone")


def _load_nnsight() -> tuple[Any, str | None]:
    return importlib.import_module("nnsight"), None


def _steering(args: argparse.Namespace, loaded: Any, mods: dict[str, Any], tmp: Path) -> dict[str, Any]:
    model, tok, L = loaded.model, loaded.tokenizer, args.layer
    art = _direction(loaded, L, tmp / "direction")
    lg = build_defense(f"add:{art},alpha={args.alpha}", loaded)
    r = Artifact.load(art).tensors["direction"].float()
    vec = (args.alpha * r).to(model.device, model.dtype)
    prompts = format_prompts(tok, read_prompts(shared_data_dir() / "refusal_direction_splits" / "harmless_val.json")[: args.batch])
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}
    outs: dict[str, torch.Tensor] = {}

    def run(key: str, ctx: Callable[[], Any]) -> Callable[[], None]:
        def fn() -> None:
            with ctx():
                outs[key] = model.generate(**enc, **gen)
        return fn

    fns = {"plain": run("plain", _nothing), "latentguard": run("latentguard", lambda: apply_defenses(model, [lg]))}
    if "steering-vectors" in mods:
        # alpha * r pre-scaled and cast like latentguard's (multiplier=1): the very same tensor is added
        sv = mods["steering-vectors"].SteeringVector({L - 1: vec}, layer_type="decoder_block")
        fns["steering_vectors"] = run("steering_vectors", lambda: sv.apply(model, multiplier=1.0))
    if "repeng" in mods:
        fns["repeng"] = run("repeng", lambda: _repeng_ctx(mods["repeng"], model, L - 1, vec))
    fns["plain_control"] = run("plain_control", _nothing)
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    times = interleaved(_cpu_timed(fns, cpu), args.rounds)
    cpu = {k: v[1:] for k, v in cpu.items()}
    n_tokens = args.batch * args.new_tokens
    peers = [k for k in fns if k not in ("plain", "latentguard", "plain_control")]
    return {  # tok/s ratios = inverse time ratios
        "over_plain": {k: ratio(times, "plain", k) for k in fns if k != "plain"},
        "latentguard_over_peer": {p: ratio(times, p, "latentguard") for p in peers},
        "cpu_time": {"over_plain": {k: ratio(cpu, "plain", k) for k in fns if k != "plain"},
                     "latentguard_over_peer": {p: ratio(cpu, p, "latentguard") for p in peers}},
        "greedy_equal_to_latentguard": {p: bool(torch.equal(outs[p], outs["latentguard"])) for p in peers},
        "steered_differs_from_plain": not torch.equal(outs["latentguard"], outs["plain"]),
        "tok_s_median": {k: n_tokens / statistics.median(v) for k, v in times.items()},
        "tok_per_cpu_s_median": {k: n_tokens / statistics.median(v) for k, v in cpu.items()},
        "settings": {"layer": L, "site": f"resid_pre.{L} = output of block {L - 1}", "alpha": args.alpha,
                     "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds,
                     "attach": "per call (context managers; repeng wraps and unwraps layer L-1)"},
    }


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _repeng_ctx(control: Any, model: torch.nn.Module, layer: int, vec: torch.Tensor) -> Any:
    import contextlib

    @contextlib.contextmanager
    def ctx() -> Any:
        cm = control.ControlModel(model, [layer])  # replaces layers[layer] with a ControlModule
        try:
            cm.set_raw_control({layer: vec})
            yield
        finally:
            cm.unwrap()

    return ctx()


def _capture(args: argparse.Namespace, loaded: Any, nnsight: Any) -> dict[str, Any]:
    model, tok, n_layers = loaded.model, loaded.tokenizer, loaded.info.n_layers
    prompts = read_prompts(shared_data_dir() / "refusal_direction_splits" / "harmless_val.json")[: args.capture_batch]
    kwargs = encode_batch(tok, format_prompts(tok, prompts), model.device).forward_kwargs()
    sites = [f"resid_post.{l}" for l in range(n_layers)]
    wrapped = nnsight.NNsight(copy.deepcopy(model))  # nnsight swaps the forward methods of what it wraps
    got: dict[str, list[torch.Tensor]] = {}

    def plain() -> None:
        model(**kwargs, use_cache=False)

    def latentguard() -> None:
        with capture(model, sites, reduce=lambda x: x[:, -1]) as rec:
            model(**kwargs, use_cache=False)
        got["latentguard"] = [rec[s][0] for s in sites]

    def nnsight_trace() -> None:
        saved = []
        with wrapped.trace(**kwargs, use_cache=False):
            for l in range(n_layers):
                saved.append(wrapped.model.layers[l].output[:, -1].save())
        got["nnsight"] = [t.to("cpu", torch.float32) for t in saved]  # as latentguard's capture returns them

    fns = {"plain": plain, "latentguard": latentguard, "nnsight": nnsight_trace, "plain_control": plain}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    times = interleaved(_cpu_timed(fns, cpu), args.rounds)
    cpu = {k: v[1:] for k, v in cpu.items()}  # drop the warm-up call
    diff = max((a - b).abs().max().item() for a, b in zip(got["latentguard"], got["nnsight"], strict=True))
    return {  # time ratios (cost: > 1 is slower), except latentguard_over_nnsight_speed (calls/s: > 1 is faster)
        "capture_over_plain": ratio(times, "latentguard", "plain"),
        "nnsight_over_plain": ratio(times, "nnsight", "plain"),
        "latentguard_over_nnsight_speed": ratio(times, "nnsight", "latentguard"),
        "control_plain_over_plain": ratio(times, "plain_control", "plain"),
        "cpu_time": {"capture_over_plain": ratio(cpu, "latentguard", "plain"), "nnsight_over_plain": ratio(cpu, "nnsight", "plain"),
                     "latentguard_over_nnsight_speed": ratio(cpu, "nnsight", "latentguard"),
                     "control_plain_over_plain": ratio(cpu, "plain_control", "plain")},
        "max_abs_diff": diff,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "settings": {"batch": args.capture_batch, "tokens": int(kwargs["input_ids"].numel()),
                     "sites": f"resid_post.0..{n_layers - 1}, last token", "rounds": args.rounds},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--capture-batch", type=int, default=16)
    ap.add_argument("--layer", type=int, default=None, help="default: 0.6 x layers (18 of 30 on the embedded model)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--no-install", action="store_true", help="do not pip install the --no-deps peers into benchmarks/.peers")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    mods, peers = _import_peers(_install(args.no_install))
    loaded = bench_model(args)
    if args.layer is None:
        args.layer = int(0.6 * loaded.info.n_layers)
    with tempfile.TemporaryDirectory() as d:
        steer = _steering(args, loaded, mods, Path(d))
    cap = _capture(args, loaded, mods["nnsight"]) if "nnsight" in mods else None
    result = {
        "peers": peers,
        **{f"latentguard_over_{p}": v for p, v in steer["latentguard_over_peer"].items()},
        **({"latentguard_over_nnsight_capture": cap["latentguard_over_nnsight_speed"]} if cap else {}),
        "goal": "none set: latentguard_over_<peer> > 1 means latentguard is faster; greedy outputs must be equal",
        "steering": steer,
        "capture": cap,
        "settings": model_settings(loaded, args),
        "wall_s": time.perf_counter() - t0,
    }
    path = write_result(result_name("bench_peers", args), result)
    for p, e in peers.items():
        print(f"{p} {e['version']}: {e['status']}" + (f" ({e.get('reason') or e.get('note')})" if e.get("reason") or e.get("note") else ""))
    for p, v in steer["latentguard_over_peer"].items():
        print(f"steering latentguard_over_{p}={v:.3f} (cpu time {steer['cpu_time']['latentguard_over_peer'][p]:.3f}); "
              f"greedy equal: {steer['greedy_equal_to_latentguard'][p]}")
    print(f"steered differs from plain: {steer['steered_differs_from_plain']}; over plain: "
          + json.dumps({k: round(v, 3) for k, v in steer["over_plain"].items()}))
    if cap:
        print(f"capture latentguard_over_nnsight={cap['latentguard_over_nnsight_speed']:.3f} (capture/plain "
              f"{cap['capture_over_plain']:.3f}, nnsight/plain {cap['nnsight_over_plain']:.3f}); max |diff| {cap['max_abs_diff']:.2e}")
    if cap:
        print(f"  cpu time: latentguard_over_nnsight={cap['cpu_time']['latentguard_over_nnsight_speed']:.3f} (capture/plain "
              f"{cap['cpu_time']['capture_over_plain']:.3f}, nnsight/plain {cap['cpu_time']['nnsight_over_plain']:.3f})")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
