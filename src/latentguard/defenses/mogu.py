"""MoGU / MoGU_v2 (arXiv 2405.14488, 2509.06807; mogu.md): per-token routing between two LoRA experts.

Each routed layer's attention out-projection W_o becomes
    o = (w_u + w_g)·W_o h + w_u·s_u B_u A_u h + w_g·s_g B_g A_g h           (mogu.md §1.1)
with two independent sigmoid gates w = σ(router(h)) read from the projection input h: `unwill`
(refuses) and `glad` (complies). The gates are not normalised (w_u + w_g ∈ (0, 2)).

Design (mogu.md §4):
- **Experts are PEFT LoRA adapters on the base**, trained one at a time with PEFT (`train()` with
  `--lora targets=<attn>.<o_proj>`), then copied into the wrappers (`experts_from_peft`). PEFT itself
  cannot mix per token: several active adapters are summed at fixed scales with the base term
  unscaled; mixed-batch `adapter_names` picks one adapter per *sample* and is inference-only;
  `add_weighted_adapter` merges statically; X-LoRA gates per token but from a second pass over the
  final hidden states, not from each projection's own input. So the mix itself is ours:
- **`MoGUProjection`, a thin module wrapper** swapped in for the out-projection (located through
  `models/arch.py`, so any architecture in that table works, GPT-2 Conv1D included) and swapped back
  on exit. Both experts run as two skinny matmuls (`A_cat` [2r, d_in], `B_cat` [d_out, 2r], the
  scalings folded into B); gates are computed in float32. A wrapper, not a hook, because the gates
  must scale the base term and the expert terms separately.
- **First-K-token routing** (mogu.md §1.4, K = 5; `defenses/token_window.py`): `handoff=recompute`
  (default, faithful) swaps `model.generate` for the duration of the block: K routed tokens, then
  the base path re-prefills prompt + prefix and continues (one model copy, wrappers switched off);
  `handoff=keep_cache` routes the prefill and the first K−1 decode steps inside one `generate` and
  keeps the routed KV cache (approximate, labelled as such). `k=all` routes every token. A plain
  forward (e.g. the eval harness's teacher-forced answer NLL) is routed at every position unless k=0.

Artefact `mogu` (tensors.safetensors + meta.json): the `MoGUModules` state dict (per routed layer
the router and the expert pair) plus its layout; loading checks the model fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor, nn

from latentguard.artifacts import Artifact
from latentguard.defenses import DEFENSES, Defense
from latentguard.defenses.token_window import first_k_generate, first_k_steps
from latentguard.errors import ArtifactError, ConfigError, UnsupportedModelError
from latentguard.hooks import encode_batch
from latentguard.models import LoadedModel, ModelInfo, arch_of, format_prompts, normalize_layer
from latentguard.registry import spec_config

__all__ = [
    "GATES",
    "MODES",
    "MOGU_KIND",
    "MoGUApplyConfig",
    "MoGUDefense",
    "MoGUGate",
    "MoGULayer",
    "MoGUModules",
    "MoGUProjection",
    "MoGURouter",
    "MoGUState",
    "attach_mogu",
    "experts_from_peft",
    "gate_params",
    "load_mogu",
    "mogu_site",
    "routed",
    "router_gates",
]

MOGU_KIND = "mogu"
GATES = ("v1", "linear", "mlp")
MODES = ("mix", "unwill", "glad", "base", "fixed")
HANDOFFS = ("recompute", "keep_cache")


def gate_params(d_in: int, kind: str, bottleneck: int = 512, hidden: int = 64) -> int:
    """Parameters of ONE gate (a router has two)."""
    if kind == "v1":  # L1 d→b (no bias), L2 b→d (bias), L3 d→1 (bias): mogu.md §1.1
        return d_in * bottleneck + bottleneck * d_in + d_in + d_in + 1
    if kind == "linear":
        return d_in + 1
    if kind == "mlp":
        return d_in * hidden + hidden + hidden + 1
    raise ConfigError(f"gate={kind!r}; use one of {', '.join(GATES)}.")


class MoGUGate(nn.Module):
    """One per-token gate logit from the projection input: `v1` (L3 L2 L1, no nonlinearity), `linear`, `mlp` (SiLU)."""

    def __init__(self, d_in: int, kind: str, bottleneck: int = 512, hidden: int = 64) -> None:
        super().__init__()
        gate_params(d_in, kind)  # validates kind
        if kind == "v1":
            self.net = nn.Sequential(nn.Linear(d_in, bottleneck, bias=False), nn.Linear(bottleneck, d_in), nn.Linear(d_in, 1))
        elif kind == "linear":
            self.net = nn.Sequential(nn.Linear(d_in, 1))
        else:
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        for m in self.net:  # HF init (mogu.md §1.1): N(0, 0.02) weights, zero biases -> gates start near 0.5
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, h: Float[Tensor, "... d_in"]) -> Float[Tensor, "... 1"]:
        return self.net(h)


class MoGURouter(nn.Module):
    """The two independent gates of one layer: `unwill` (w_u) and `glad` (w_g), computed in float32."""

    def __init__(self, d_in: int, gate: str, bottleneck: int = 512, hidden: int = 64) -> None:
        super().__init__()
        self.unwill = MoGUGate(d_in, gate, bottleneck, hidden)
        self.glad = MoGUGate(d_in, gate, bottleneck, hidden)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(w_u, w_g), each [..., 1], float32."""
        x = h.to(torch.float32)
        return torch.sigmoid(self.unwill(x)), torch.sigmoid(self.glad(x))


class MoGULayer(nn.Module):
    """One routed layer: its `router` and the expert pair `A` [2r, d_in], `B` [d_out, 2r]."""

    def __init__(self, d_in: int, d_out: int, rank: int, gate: str, bottleneck: int = 512, hidden: int = 64) -> None:
        super().__init__()
        self.rank = rank
        self.router = MoGURouter(d_in, gate, bottleneck, hidden)
        # rows 0..r-1 of A (columns of B) are Unwill, r..2r-1 Glad; B carries each expert's scaling s
        self.A = nn.Parameter(torch.zeros(2 * rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, 2 * rank))

    def set_expert(self, which: str, a: Tensor, b: Tensor, scaling: float) -> None:
        """Copy one LoRA expert (A [r, d_in], B [d_out, r], scaling s = alpha/r) into its slot."""
        r = self.rank
        if a.shape != (r, self.A.shape[1]) or b.shape != (self.B.shape[0], r):
            raise ArtifactError(
                f"Expert {which} has A {tuple(a.shape)} / B {tuple(b.shape)}, the layer needs "
                f"({r}, {self.A.shape[1]}) / ({self.B.shape[0]}, {r}); train both experts with the same rank on this model."
            )
        rows = slice(0, r) if which == "unwill" else slice(r, 2 * r)
        with torch.no_grad():
            self.A[rows] = a.to(self.A.dtype)
            self.B[:, rows] = (scaling * b).to(self.B.dtype)


class MoGUModules(nn.Module):
    """Every routed layer's `MoGULayer`, keyed by layer index; what the artefact stores."""

    def __init__(self, layers: Sequence[int], d_in: int, d_out: int, rank: int = 8, gate: str = "v1",
                 bottleneck: int = 512, gate_hidden: int = 64) -> None:
        super().__init__()
        if not layers:
            raise ConfigError("MoGU needs at least one routed layer.")
        if rank < 1:
            raise ConfigError(f"rank={rank}; use >= 1.")
        self.layout: dict[str, Any] = {"layers": sorted(int(l) for l in layers), "d_in": d_in, "d_out": d_out, "rank": rank,
                       "gate": gate, "bottleneck": bottleneck, "gate_hidden": gate_hidden}
        self.layers = nn.ModuleDict({str(l): MoGULayer(d_in, d_out, rank, gate, bottleneck, gate_hidden)
                                     for l in self.layout["layers"]})

    @classmethod
    def for_model(cls, model: nn.Module, layers: Sequence[int], **kw: Any) -> MoGUModules:
        """Fresh modules sized from the model's own out-projection (never from hidden_size)."""
        n = len(arch_of(model).layer_list(model))
        layers = sorted({normalize_layer(int(l), n) for l in layers})
        d_in, d_out = _proj_dims(model, layers[0])
        return cls(layers, d_in, d_out, **kw)

    def layer(self, l: int) -> MoGULayer:
        return cast(MoGULayer, self.layers[str(l)])

    def _layers(self) -> list[tuple[str, MoGULayer]]:
        return [(k, cast(MoGULayer, m)) for k, m in self.layers.items()]

    def routers(self) -> nn.ModuleDict:
        """The routers alone, keyed like `layers` (what router training updates)."""
        return nn.ModuleDict({k: m.router for k, m in self._layers()})

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.routers().parameters())

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in self._layers() for p in (m.A, m.B)]

    def counts(self) -> dict[str, int]:
        """Parameter counts: routers and experts (both adapters)."""
        return {"router": sum(p.numel() for p in self.router_parameters()),
                "experts": sum(p.numel() for p in self.expert_parameters())}

    def to_artifact(self, meta: dict[str, Any]) -> Artifact:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        return Artifact(kind=MOGU_KIND, tensors=tensors,
                        meta={"defense": MOGU_KIND, "layout": self.layout, "params": self.counts(), **meta})

    @classmethod
    def from_artifact(cls, art: Artifact) -> MoGUModules:
        lay = art.meta.get("layout")
        if not isinstance(lay, dict):
            raise ArtifactError(f"MoGU artefact has no layout in its meta.json (kind {art.kind!r}); rebuild it with `latentguard train --method mogu`.")
        mods = cls(lay["layers"], lay["d_in"], lay["d_out"], lay["rank"], lay["gate"], lay["bottleneck"], lay["gate_hidden"])
        try:
            mods.load_state_dict(art.tensors, strict=True)
        except RuntimeError as e:
            raise ArtifactError(f"MoGU artefact tensors do not match its layout ({e}); rebuild it.") from e
        return mods


def _proj_dims(model: nn.Module, layer: int) -> tuple[int, int]:
    """(d_in, d_out) of the out-projection; GPT-2's Conv1D stores its weight [in, out]."""
    arch = arch_of(model)
    mod = arch.o_proj_module(model, layer)
    w = getattr(mod, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise UnsupportedModelError(
            f"The out-projection of layer {layer} ({type(mod).__name__}) has no plain 2-D weight; "
            "MoGU needs an unquantised o_proj (see models/arch.py)."
        )
    return (w.shape[0], w.shape[1]) if arch.conv1d else (w.shape[1], w.shape[0])


def mogu_site(model: nn.Module) -> str:
    """The PEFT target of the out-projection, e.g. `self_attn.o_proj` (Llama) or `attn.c_proj` (GPT-2)."""
    arch = arch_of(model)
    return f"{arch.attn}.{arch.o_proj}"


@dataclass
class MoGUState:
    """Run-time switches shared by every wrapper of one attachment, and the gate recorder.

    `active=False` sends every wrapper down the base path; `gates[l]` holds the latest (w_u, w_g)
    of layer l when `record` is on (overwritten on each call, so gradient checkpointing is safe).
    """

    mode: str = "mix"
    fixed: tuple[float, float] = (1.0, 0.0)
    active: bool = True
    record: bool = False
    gates: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


class MoGUProjection(nn.Module):
    """Stands in for one out-projection: `base` output mixed with the two experts by the gates."""

    def __init__(self, base: nn.Module, layer: MoGULayer, state: MoGUState, index: int) -> None:
        super().__init__()
        self.base = base
        self.mogu = layer
        self.state = state
        self.index = index

    def forward(self, h: Tensor) -> Tensor:
        y = self.base(h)
        st = self.state
        if not st.active or st.mode == "base":
            return y
        if st.mode == "mix":
            wu, wg = self.mogu.router(h)
            if st.record:
                st.gates[self.index] = (wu, wg)
        else:
            wu_f, wg_f = {"unwill": (1.0, 0.0), "glad": (0.0, 1.0)}.get(st.mode, st.fixed)
            wu, wg = h.new_full((*h.shape[:-1], 1), wu_f), h.new_full((*h.shape[:-1], 1), wg_f)
        wu, wg = wu.to(y.dtype), wg.to(y.dtype)
        r = self.mogu.rank
        z = h @ self.mogu.A.t()  # [..., 2r]: both experts' down-projections in one matmul
        z = torch.cat([z[..., :r] * wu, z[..., r:] * wg], dim=-1)
        return (wu + wg) * y + z @ self.mogu.B.t()  # Eq. of mogu.md §1.1


@contextlib.contextmanager
def attach_mogu(model: nn.Module, modules: MoGUModules, state: MoGUState) -> Iterator[MoGUState]:
    """Swap each routed layer's out-projection for a `MoGUProjection`; the originals return on exit, also on error."""
    arch = arch_of(model)
    n = len(arch.layer_list(model))
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for l in modules.layout["layers"]:
            if l >= n:
                raise ArtifactError(f"MoGU routes layer {l}, the model has {n} layers; use an artefact built on this model.")
            parent, name = arch.attn_module(model, l), arch.o_proj
            base = getattr(parent, name)
            if isinstance(base, MoGUProjection):
                raise ConfigError(f"Layer {l} already carries a MoGU router; apply one MoGU defence at a time.")
            if _proj_dims(model, l) != (modules.layout["d_in"], modules.layout["d_out"]):
                raise ArtifactError(f"MoGU layer {l} is sized {modules.layout['d_in']}->{modules.layout['d_out']}, the model's "
                                    f"out-projection is {_proj_dims(model, l)}; use an artefact built on this model.")
            setattr(parent, name, MoGUProjection(base, modules.layer(l), state, l))
            swapped.append((parent, name, base))
        yield state
    finally:
        for parent, name, base in reversed(swapped):
            setattr(parent, name, base)
        state.gates.clear()


def routed(model: nn.Module) -> list[int]:
    """Layers whose out-projection currently carries a MoGU wrapper (empty after every block exits)."""
    return sorted(m.index for m in model.modules() if isinstance(m, MoGUProjection))


def experts_from_peft(adapter_dir: str | Path, model: nn.Module, layers: Sequence[int]) -> dict[int, tuple[Tensor, Tensor, float]]:
    """{layer: (A [r, d_in], B [d_out, r], scaling)} from a PEFT LoRA adapter saved on `model`'s out-projections."""
    path = Path(adapter_dir)
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise ArtifactError(f"{path} is not a PEFT adapter (needs adapter_config.json and adapter_model.safetensors).")
    cfg = json.loads(cfg_file.read_text())
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    weights = load_file(str(w_file))
    names = {id(m): n for n, m in model.named_modules()}
    arch, out = arch_of(model), {}
    for l in layers:
        name = names[id(arch.o_proj_module(model, l))]
        key = f"base_model.model.{name}"
        if f"{key}.lora_A.weight" not in weights:
            raise ArtifactError(f"{path} has no LoRA on {name} (layer {l}); train the expert with --lora targets={mogu_site(model)}.")
        out[l] = (weights[f"{key}.lora_A.weight"].float(), weights[f"{key}.lora_B.weight"].float(), scaling)
    return out


def load_mogu(path: str | Path, info: ModelInfo | None = None) -> tuple[MoGUModules, Artifact]:
    """Load a MoGU artefact (a directory, or a training run holding `mogu/`), checked against `info`."""
    p = Path(path)
    if not (p / "tensors.safetensors").is_file() and (p / "mogu" / "meta.json").is_file():
        p = p / "mogu"
    art = Artifact.load(p, expect=MOGU_KIND, model=info)
    return MoGUModules.from_artifact(art), art


def _to_model(modules: MoGUModules, model: nn.Module) -> None:
    """Experts in the model's device and dtype; routers on its device in float32 (gates are computed in fp32)."""
    p = next(model.parameters())
    for _, m in modules._layers():
        m.A.data, m.B.data = m.A.data.to(p.device, p.dtype), m.B.data.to(p.device, p.dtype)
        m.router.to(p.device, torch.float32)


@torch.no_grad()
def router_gates(loaded: LoadedModel, modules: MoGUModules, prompts: Sequence[str],
                 batch_size: int = 16) -> dict[str, Tensor]:
    """Gates on chat-formatted prompts: `last` (last prompt token) and `mean` (over the prompt), each [n, L, 2] (w_u, w_g)."""
    tok, model = loaded.tokenizer, loaded.model
    _to_model(modules, model)
    layers = modules.layout["layers"]
    state = MoGUState(record=True)
    last, mean = [], []
    with attach_mogu(model, modules, state):
        for i in range(0, len(prompts), batch_size):
            b = encode_batch(tok, format_prompts(tok, list(prompts[i:i + batch_size])), model.device)
            model(**b.forward_kwargs(), use_cache=False, logits_to_keep=1)  # only the gates are read
            g = torch.stack([torch.cat(state.gates[l], dim=-1) for l in layers], dim=1).float()  # [B, L, T, 2]
            m = b.attention_mask[:, None, :, None].to(g.dtype)
            last.append(g[:, :, -1].cpu())  # left padding: the last column is every row's last prompt token
            mean.append(((g * m).sum(2) / m.sum(2)).cpu())
    return {"last": torch.cat(last), "mean": torch.cat(mean)}


# ---------------------------------------------------------------- the defence


@dataclass
class MoGUApplyConfig:
    k: int | None = field(default=None, metadata={
        "help": "routed response tokens; None = the artefact's (spec: 5); -1 or 'all' = every token",
        "parse": lambda v: -1 if v.strip().lower() == "all" else int(v), "fix": "k is an integer or 'all'"})
    mode: str = field(default="mix", metadata={"help": "mix (routers), unwill / glad (that expert alone), base, fixed (gates wu, wg)"})
    wu: float = field(default=1.0, metadata={"help": "fixed Unwill gate (mode=fixed)"})
    wg: float = field(default=0.0, metadata={"help": "fixed Glad gate (mode=fixed)"})
    handoff: str = field(default="recompute", metadata={"help": "recompute (base re-prefills prompt + routed prefix; faithful) or keep_cache (approximate)"})

    def __post_init__(self) -> None:
        if self.k is not None and self.k < -1:
            raise ConfigError(f"k={self.k}; use k >= 0 routed tokens, or k=all (-1) to route every token.")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {', '.join(MODES)}.")
        if self.handoff not in HANDOFFS:
            raise ConfigError(f"handoff={self.handoff!r}; use one of {', '.join(HANDOFFS)}.")
        if not (math.isfinite(self.wu) and math.isfinite(self.wg)):
            raise ConfigError(f"wu={self.wu}, wg={self.wg}; pass finite gate values.")


def _parse(params: dict[str, str]) -> MoGUApplyConfig:
    return cast(MoGUApplyConfig, spec_config(MoGUApplyConfig, params, "MoGU"))


@DEFENSES.register(MOGU_KIND)
class MoGUDefense(Defense):
    """`mogu:DIR[,k=5][,mode=mix][,handoff=recompute]`: route the first K response tokens between the experts."""

    key = MOGU_KIND

    def __init__(self, modules: MoGUModules, config: MoGUApplyConfig, artefact: str, meta: dict[str, Any]) -> None:
        self.modules, self.config, self.artefact, self.meta = modules, config, artefact, meta
        if config.k is None:
            config.k = int(meta.get("k", 5))

    @classmethod
    def from_spec(cls, artefact: str | None, params: dict[str, str], loaded: LoadedModel) -> Defense:
        if artefact is None:
            raise ConfigError("Defence 'mogu' needs an artefact: mogu:DIR (the --out of `latentguard train --method mogu`).")
        cfg = _parse(params)
        modules, art = load_mogu(artefact, loaded.info)
        return cls(modules, cfg, artefact, art.meta)

    @property
    def k(self) -> int | None:
        """Routed tokens in generation; None = every token."""
        k = self.config.k
        return None if k is None or k < 0 else k

    def state(self) -> MoGUState:
        c = self.config
        return MoGUState(mode=c.mode, fixed=(c.wu, c.wg), active=self.k != 0)

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[None]:  # type: ignore[override]
        _to_model(self.modules, model)
        st = self.state()
        with attach_mogu(model, self.modules, st):
            k = self.k
            if k is None or k == 0:
                yield
            elif self.config.handoff == "recompute":
                with first_k_generate(model, st, k):
                    yield
            else:
                with first_k_steps(model, st, k):
                    yield

    def describe(self) -> dict[str, Any]:
        return {"defense": self.key, "artefact": self.artefact,
                "artefact_fingerprint": self.meta.get("model", {}).get("fingerprint", ""),
                "method": self.meta.get("method"), "layers": self.modules.layout["layers"],
                "gate": self.modules.layout["gate"], **asdict(self.config)}
