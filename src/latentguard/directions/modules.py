"""Module robustness for ML-LR (spec shared/specs/ml_lr.md §2; a RECONSTRUCTION, low confidence).

1. Security proxy: per layer ℓ ∈ P (default {⌊L/2⌋, ⌊3L/4⌋, L−1}) a logistic probe on the
   standardised `resid_pre.ℓ` at the last prompt token, harmful (1) vs harmless (0); layers whose
   held-out accuracy is below `min_probe_acc` are dropped. Margin m_ℓ = wᵀ·std(h) + b.
2. Units u = (projection role, group of ⌈L/8⌉ consecutive layers). Drift of modified weights θ′ on
   the held-out prompts E: D(θ′) = mean_ℓ (sep_ℓ(θ0) − sep_ℓ(θ′)) / sep_ℓ(θ0), with sep = mean
   margin harmful − mean margin harmless. The `perturb` scorer sets θ_u = θ0 + ε·std(W)·N(0, 1) on
   every weight of u (K seeds averaged; weights restored exactly). It measures sensitivity, not
   IFT drift (the spec's `finetune` scorer is not built). Robustness R_u = −D(θ_u).
3. Search: units by D ascending; add u to S when D(S ∪ {u}, jointly) ≤ τ·D(all units).
The result is a `module_scores` artefact; `latentguard analyze modules` writes it with a heat map.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from latentguard.artifacts import Artifact, sha256_of_texts
from latentguard.directions.selection import EncodedPrompts, encode_prompts
from latentguard.errors import ConfigError, DataError, UnsupportedModelError
from latentguard.hooks import capture
from latentguard.models import (
    PROJECTION_ROLES,
    LoadedModel,
    arch_of,
    format_prompts,
    normalize_layer,
)

__all__ = [
    "ARTIFACT_KIND",
    "ModuleData",
    "ModuleScoreConfig",
    "SecurityProxy",
    "Unit",
    "fit_security_proxy",
    "make_units",
    "module_data_from_splits",
    "perturbed",
    "score_modules",
    "unit_modules",
]

ARTIFACT_KIND = "module_scores"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ModuleScoreConfig:
    proxy_layers: str | None = field(default=None, metadata=_h("probe layers, comma list (default: L/2, 3L/4, L-1)"))
    module_types: str = field(default="q,k,v,o", metadata=_h("projection roles forming units: q,k,v,o[,gate,up,down]"))
    layer_group: int | None = field(default=None, metadata=_h("consecutive layers per unit (default: ceil(L/8))"))
    scorer: str = field(default="perturb", metadata=_h("perturb (relative Gaussian noise per unit); finetune is not built"))
    perturb_eps: float = field(default=0.05, metadata=_h("noise scale relative to each weight matrix's std"))
    seeds: int = field(default=2, metadata=_h("noise seeds averaged per evaluation"))
    seed: int = field(default=0, metadata=_h("first noise seed"))
    tau: float = field(default=0.25, metadata=_h("a unit joins the robust set while D(S+u) <= tau * D(all units)"))
    max_evals: int = field(default=32, metadata=_h("joint evaluations in the search"))
    stop_at_first: bool = field(default=False, metadata=_h("stop the search at the first unit that breaches tau"))
    min_probe_acc: float = field(default=0.95, metadata=_h("held-out accuracy a probe layer needs to be kept"))
    probe_l2: float = field(default=1e-3, metadata=_h("L2 strength of the probes (on the mean log-loss)"))
    batch_size: int = field(default=16, metadata=_h("prompts per forward pass"))

    def __post_init__(self) -> None:
        roles = self.roles()
        bad = [r for r in roles if r not in PROJECTION_ROLES]
        if bad or not roles:
            raise ConfigError(f"module_types={self.module_types!r}: unknown {bad}; use some of {', '.join(PROJECTION_ROLES)}.")
        if self.scorer != "perturb":
            raise ConfigError(f"scorer={self.scorer!r}; only 'perturb' is built (the spec's GPU 'finetune' scorer is not).")
        if not (math.isfinite(self.perturb_eps) and self.perturb_eps > 0):
            raise ConfigError(f"perturb_eps={self.perturb_eps}; use a value > 0.")
        for name in ("seeds", "max_evals", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; use >= 1.")
        if self.layer_group is not None and self.layer_group < 1:
            raise ConfigError(f"layer_group={self.layer_group}; use >= 1.")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"tau={self.tau}; use a value in (0, 1].")
        if not 0 <= self.min_probe_acc <= 1:
            raise ConfigError(f"min_probe_acc={self.min_probe_acc}; use a value in [0, 1].")

    def roles(self) -> list[str]:
        return [r.strip() for r in self.module_types.split(",") if r.strip()]

    def probe_layers(self, n_layers: int) -> list[int]:
        if self.proxy_layers is None:
            return sorted({n_layers // 2, (3 * n_layers) // 4, n_layers - 1})
        try:
            layers = [int(x) for x in self.proxy_layers.split(",") if x.strip()]
        except ValueError as e:
            raise ConfigError(f"proxy_layers={self.proxy_layers!r}; write integers separated by commas.") from e
        return sorted({normalize_layer(l, n_layers) for l in layers})


@dataclass(frozen=True)
class Unit:
    """One module type over a group of consecutive layers."""

    role: str
    layers: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.role}@{self.layers[0]}-{self.layers[-1]}"


def make_units(n_layers: int, roles: Sequence[str], group: int | None = None) -> list[Unit]:
    g = group or math.ceil(n_layers / 8)
    return [Unit(r, tuple(range(s, min(s + g, n_layers)))) for r in roles for s in range(0, n_layers, g)]


def unit_modules(model: nn.Module, unit: Unit) -> list[nn.Module]:
    """The unit's projection modules, resolved through models/arch.py (LoRA-wrapped ones included)."""
    arch = arch_of(model)
    return [arch.projection_module(model, l, unit.role) for l in unit.layers]


def _weight(module: nn.Module) -> Tensor:
    base = getattr(module, "base_layer", module)  # PEFT LoRA layers keep the original under base_layer
    weight = base.weight
    if not isinstance(weight, Tensor):
        raise UnsupportedModelError(f"{type(base).__name__} has no weight tensor to perturb; pick other module types.")
    return weight


@contextmanager
def perturbed(modules: Sequence[nn.Module], eps: float, seed: int) -> Iterator[None]:
    """Add ε·std(W)·N(0, 1) to each module's weight inside the block; the originals come back on exit."""
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in modules:
                w = _weight(m)
                saved.append((w, w.detach().clone()))
                noise = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device, w.dtype)
                w.add_(eps * w.float().std().to(w.dtype) * noise)
        yield
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


@dataclass
class ModuleData:
    """Raw prompts: probe fit sets and the held-out evaluation set E."""

    fit_harmful: list[str]
    fit_harmless: list[str]
    val_harmful: list[str]
    val_harmless: list[str]

    def hashes(self) -> dict[str, str]:
        return {f"{k}_sha256": sha256_of_texts(v) for k, v in asdict(self).items()}


def _read_split(path: Path) -> list[str]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [r if isinstance(r, str) else r["instruction"] for r in rows]


def module_data_from_splits(splits: Path, n_fit: int = 128, n_val: int = 32, seed: int = 42) -> ModuleData:
    """Seeded samples of `refusal_direction_splits`: *_train to fit, *_val as E (spec §2.1)."""
    if not (splits / "harmful_train.json").is_file():
        raise DataError(f"{splits} holds no harmful_train.json; pass the shared refusal_direction_splits folder.")
    sets = []
    for name, n in (("harmful_train", n_fit), ("harmless_train", n_fit), ("harmful_val", n_val), ("harmless_val", n_val)):
        prompts = _read_split(splits / f"{name}.json")
        sets.append(random.Random(seed).sample(prompts, min(n, len(prompts))))
    return ModuleData(*sets)


@dataclass
class SecurityProxy:
    """Standardised logistic probes per kept layer: margin = w·(h − mean)/std + b."""

    layers: list[int]
    weight: Float[Tensor, "P d"]
    bias: Float[Tensor, " P"]
    mean: Float[Tensor, "P d"]
    std: Float[Tensor, "P d"]
    val_acc: dict[int, float]
    dropped: list[int]

    def margins(self, feats: Float[Tensor, "n P d"]) -> Float[Tensor, "n P"]:
        x = (feats.double() - self.mean.double()) / self.std.double()
        return torch.einsum("npd,pd->np", x, self.weight.double()) + self.bias.double()


@torch.no_grad()
def _features(loaded: LoadedModel, prompts: EncodedPrompts, layers: Sequence[int]) -> Float[Tensor, "n P d"]:
    sites = [f"resid_pre.{l}" for l in layers]
    acts = []
    with capture(loaded.model, sites, reduce=lambda x: x[:, -1]) as rec:
        for b in prompts.batches:
            loaded.model(**b, use_cache=False, logits_to_keep=1)
            acts.append(torch.stack([rec[s].pop() for s in sites], dim=1))
    return torch.cat(acts).double()


def _fit_layer(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    mean, std = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=1.0 / (l2 * len(y)), solver="lbfgs", max_iter=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 100 LBFGS iterations is the spec's budget, converged or not
        clf.fit((x - mean) / std, y)
    return clf.coef_[0], float(clf.intercept_[0]), mean, std


def fit_security_proxy(loaded: LoadedModel, data: ModuleData, cfg: ModuleScoreConfig) -> tuple[SecurityProxy, EncodedPrompts, int]:
    """Probes on the fit sets, accuracy on E; returns the proxy, E encoded, and E's harmful count."""
    tok = loaded.tokenizer
    layers = cfg.probe_layers(loaded.info.n_layers)
    enc = {k: encode_prompts(loaded, format_prompts(tok, v), cfg.batch_size) for k, v in asdict(data).items()}
    empty = [k for k, v in asdict(data).items() if not v]
    if empty:
        raise DataError(f"Prompt sets {empty} are empty; pass prompts for every set.")
    fit = torch.cat([_features(loaded, enc["fit_harmful"], layers), _features(loaded, enc["fit_harmless"], layers)])
    y_fit = np.array([1] * len(data.fit_harmful) + [0] * len(data.fit_harmless))
    e_text = data.val_harmful + data.val_harmless
    e_enc = encode_prompts(loaded, format_prompts(tok, e_text), cfg.batch_size)
    val = _features(loaded, e_enc, layers)
    y_val = np.array([1] * len(data.val_harmful) + [0] * len(data.val_harmless))
    kept, rows, acc, dropped = [], [], {}, []
    for p, l in enumerate(layers):
        w, b, mean, std = _fit_layer(fit[:, p].numpy(), y_fit, cfg.probe_l2)
        margin = ((val[:, p].numpy() - mean) / std) @ w + b
        acc[l] = float(((margin > 0).astype(int) == y_val).mean())
        if acc[l] >= cfg.min_probe_acc:
            kept.append(l)
            rows.append((w, b, mean, std))
        else:
            dropped.append(l)
            warnings.warn(f"Probe at resid_pre.{l} reaches held-out accuracy {acc[l]:.2f} < {cfg.min_probe_acc}; dropped.",
                          stacklevel=2)
    if not kept:
        raise DataError(f"No probe layer reaches held-out accuracy {cfg.min_probe_acc} (got {acc}); lower min_probe_acc, "
                        "add prompts, or pick other proxy_layers.")
    t = lambda i: torch.tensor(np.stack([r[i] for r in rows]))
    proxy = SecurityProxy(kept, t(0), torch.tensor([r[1] for r in rows]), t(2), t(3), acc, dropped)
    return proxy, e_enc, len(data.val_harmful)


def _separation(loaded: LoadedModel, proxy: SecurityProxy, e_enc: EncodedPrompts, n_harm: int) -> Tensor:
    m = proxy.margins(_features(loaded, e_enc, proxy.layers))
    return m[:n_harm].mean(0) - m[n_harm:].mean(0)


class _Scorer:
    """D(θ′) of perturbed unit sets against the unperturbed separation, averaged over seeds."""

    def __init__(self, loaded: LoadedModel, proxy: SecurityProxy, e_enc: EncodedPrompts, n_harm: int,
                 cfg: ModuleScoreConfig) -> None:
        self.loaded, self.proxy, self.e_enc, self.n_harm, self.cfg = loaded, proxy, e_enc, n_harm, cfg
        self.sep0 = _separation(loaded, proxy, e_enc, n_harm)
        self.calls = 0

    def drift(self, units: Sequence[Unit]) -> float:
        mods = [m for u in units for m in unit_modules(self.loaded.model, u)]
        values = []
        for k in range(self.cfg.seeds):
            with perturbed(mods, self.cfg.perturb_eps, self.cfg.seed + k):
                sep = _separation(self.loaded, self.proxy, self.e_enc, self.n_harm)
            values.append(float(((self.sep0 - sep) / self.sep0).mean()))
            self.calls += 1
        return sum(values) / len(values)


def _search(scorer: _Scorer, units: list[Unit], drift: dict[Unit, float], cfg: ModuleScoreConfig) -> tuple[list[Unit], float, list[dict[str, Any]]]:
    d_all = scorer.drift(units)
    chosen: list[Unit] = []
    log = []
    for u in sorted(units, key=lambda v: drift[v])[: cfg.max_evals]:
        d = scorer.drift([*chosen, u])
        ok = d <= cfg.tau * d_all
        log.append({"unit": u.name, "joint_drift": d, "added": ok})
        if ok:
            chosen.append(u)
        elif cfg.stop_at_first:
            break
    if not chosen:
        raise ConfigError(f"The search found no robust unit: every D(S+u) > tau*D_all = {cfg.tau * d_all:.4g}; raise tau "
                          "or check the probes.")
    return chosen, d_all, log


def score_modules(loaded: LoadedModel, data: ModuleData, cfg: ModuleScoreConfig,
                  progress: Callable[[str], None] | None = None) -> Artifact:
    """Probes, per-unit drift and the robust set of `loaded` as a `module_scores` artefact."""
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        proxy, e_enc, n_harm = fit_security_proxy(loaded, data, cfg)
        units = make_units(loaded.info.n_layers, cfg.roles(), cfg.layer_group)
        for u in units:  # resolve every module before the slow part
            unit_modules(model, u)
        scorer = _Scorer(loaded, proxy, e_enc, n_harm, cfg)
        drift = {}
        for u in units:
            drift[u] = scorer.drift([u])
            if progress is not None:
                progress(f"{u.name}: D={drift[u]:+.4f}")
        robust, d_all, log = _search(scorer, units, drift, cfg)
    finally:
        model.train(was_training)
    return _artifact(units, drift, robust, d_all, log, proxy, scorer, data, cfg)


def _artifact(units: list[Unit], drift: dict[Unit, float], robust: list[Unit], d_all: float, log: list[dict[str, Any]],
              proxy: SecurityProxy, scorer: _Scorer, data: ModuleData, cfg: ModuleScoreConfig) -> Artifact:
    values = [drift[u] for u in units]
    spread = (max(values) / min(values)) if min(values) > 0 else None
    meta = {
        "units": [{"name": u.name, "role": u.role, "layers": list(u.layers), "drift": drift[u], "robustness": -drift[u],
                   "robust": u in robust} for u in units],
        "robust": [u.name for u in robust], "drift_all": d_all, "tau": cfg.tau, "search": log,
        "proxy_layers": proxy.layers, "probe_val_acc": {str(k): v for k, v in proxy.val_acc.items()},
        "dropped_layers": proxy.dropped, "separation_base": _sep_meta(scorer), "evaluations": scorer.calls,
        "drift_spread": spread, "scorer": cfg.scorer, "measures": "sensitivity to relative Gaussian noise, not IFT drift",
        "config": asdict(cfg), "data": data.hashes(), "counts": {k: len(v) for k, v in asdict(data).items()},
        "confidence": "reconstruction (ml_lr.md): probe form, drift formula, units, search and tau are low-confidence",
    }
    tensors = {"drift": torch.tensor(values, dtype=torch.float32),
               "robust": torch.tensor([u in robust for u in units], dtype=torch.uint8),
               "probe_weight": proxy.weight.float(), "probe_bias": proxy.bias.float(),
               "probe_mean": proxy.mean.float(), "probe_std": proxy.std.float()}
    return Artifact(kind=ARTIFACT_KIND, tensors=tensors, meta=meta)


def _sep_meta(scorer: _Scorer) -> dict[str, float]:
    return {str(l): float(v) for l, v in zip(scorer.proxy.layers, scorer.sep0.tolist(), strict=True)}
