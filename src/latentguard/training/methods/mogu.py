"""MoGU and MoGU_v2 training (mogu.md): `mogu` and `mogu2` drive the stages; `mogu_expert` and
`mogu_router` are the stages, each one `train()` call (trl's SFTTrainer underneath, no loop of ours).

Why a stage driver: the stages need different models and losses — two LoRA experts with a
ratio loss over a contrast response (two forwards per row), then routers on the frozen base with
CE + gate supervision — which one trainer run cannot hold. `train(--method mogu)` therefore calls
`MoGUMethod.run()` (extension point (h)), which runs `training/mogu.py`: data -> [v2: layer scores]
-> glad -> unwill -> checkpoint selection -> routers -> the `mogu` artefact, each stage skipped when
done and resumed from its checkpoints when cut off.

- `mogu_expert`: PEFT LoRA on the out-projection (`--lora ...,targets=<attn>.<o_proj>`). Loss
  (replaces CE, extension point (g)), per row with token-mean CE over the response:
  `ratio` CE(Y|x)/CE(Y_contrast|x) (faithful, mogu.md §1.3), `ratio_clamped` (contrast CE capped,
  so inflating it stops paying), or `margin` CE_t + β·max(0, m − CE_c) (pitfall 3). The contrast
  rows (column `contrast` of the data file) are tokenised like trl's rows and run in a second forward.
- `mogu_router`: `--lora none` (only the routers train) or a backbone LoRA (IFT / restore); the
  MoGU wrappers from `--mogu-init` are swapped in for the run. Loss: CE(Y|x) + λ[mean(w_u−y)² +
  mean(w_g−(1−y))²] over layers and unpadded positions (`all`, faithful) or from the instruction on
  (`from_instruction`, pitfall 4); y is each row's `label` column (1 = malicious; task rows 0).
- Targets carry no EOS (mogu.md §1.2): the template's closing tokens are left out of the CE.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from latentguard.defenses.mogu import GATES, MoGUState, attach_mogu, load_mogu
from latentguard.errors import ConfigError
from latentguard.models import LoadedModel
from latentguard.training.config import TrainConfig
from latentguard.training.data import load_spec, parse_data_spec
from latentguard.training.methods.base import TrainBatch, TrainingMethod
from latentguard.training.methods.registry import METHODS

__all__ = [
    "EXPERT_LOSSES",
    "MoGU2Config",
    "MoGUConfig",
    "MoGUExpertMethod",
    "MoGURouterMethod",
    "expert_loss",
    "gate_loss",
    "response_ce",
    "template_lengths",
]

EXPERT_LOSSES = ("ratio", "ratio_clamped", "margin")
POSITIONS = ("all", "from_instruction")
TRAINABLE = ("routers", "routers+experts", "none")
_PLACEHOLDER = "\x00MOGU\x00"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class MoGUConfig(TrainConfig):
    """`mogu` (v1 as released) and its stages; trl fields (--lr, --epochs) apply to a single stage run."""

    mogu_n_harmful: int = field(default=64, metadata=_h("malicious instructions (X_m)"))
    mogu_n_benign: int = field(default=64, metadata=_h("benign instructions (X_b)"))
    mogu_answer_tokens: int = field(default=32, metadata=_h("greedy tokens of the base model's own answers (Y_g)"))
    mogu_response_tokens: int = field(default=24, metadata=_h("targets cut to this many tokens (first sentences)"))
    mogu_n_val: int = field(default=24, metadata=_h("validation prompts per side for expert checkpoint selection"))
    mogu_n_borderline: int = field(default=16, metadata=_h("harmful-sounding benign prompts added to the router's benign rows "
                                                            "(project extension against over-refusal; 0 = the spec's data)"))
    mogu_expert_lora: str = field(default="r=8,alpha=16,dropout=0.05", metadata=_h("expert LoRA (targets: the out-projection)"))
    mogu_expert_lr: float = field(default=2e-4, metadata=_h("expert learning rate (spec §6: 2e-4; the embedded model needed 1e-3 to 2e-3, docs/mogu.md)"))
    mogu_expert_epochs: int = field(default=5, metadata=_h("expert epochs (a checkpoint each)"))
    mogu_expert_batch: int = field(default=8, metadata=_h("expert batch (pairs)"))
    mogu_loss: str = field(default="ratio", metadata=_h("expert loss: ratio (faithful), ratio_clamped, margin"))
    mogu_ratio_cap: float = field(default=5.0, metadata=_h("ratio_clamped: contrast CE capped at this (nats)"))
    mogu_margin: float = field(default=3.0, metadata=_h("margin: contrast CE pushed above this (nats)"))
    mogu_margin_weight: float = field(default=1.0, metadata=_h("margin: weight of the contrast hinge"))
    mogu_select: bool = field(default=True, metadata=_h("pick each expert's checkpoint on the validation prompts"))
    mogu_gate: str | None = field(default=None, metadata=_h("gate: v1 (512 bottleneck, faithful), linear, mlp; default v1 (mogu), linear (mogu2)"))
    mogu_bottleneck: int = field(default=512, metadata=_h("v1 gate bottleneck"))
    mogu_gate_hidden: int = field(default=64, metadata=_h("mlp gate hidden width"))
    mogu_lambda: float = field(default=2.0, metadata=_h("weight of the gate-supervision loss"))
    mogu_gate_positions: str | None = field(default=None, metadata=_h("gate loss positions: all (faithful) or from_instruction; default all (mogu), from_instruction (mogu2)"))
    mogu_router_lr: float = field(default=5e-4, metadata=_h("router learning rate"))
    mogu_router_epochs: int = field(default=4, metadata=_h("router epochs"))
    mogu_router_batch: int = field(default=8, metadata=_h("router batch"))
    mogu_router_accum: int = field(default=2, metadata=_h("router gradient accumulation (spec: 16 rows per step)"))
    mogu_k: int = field(default=5, metadata=_h("routed response tokens at inference (stored in the artefact)"))
    mogu_init: str | None = field(default=None, metadata=_h("[stage] MoGU artefact the router stage starts from"))
    mogu_train: str = field(default="routers", metadata=_h("[stage] what the router stage trains: routers, routers+experts, none"))
    mogu_eos: bool = field(default=False, metadata=_h("[stage] keep the EOS/closing tokens in the CE (task data); default no EOS"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mogu_loss not in EXPERT_LOSSES:
            raise ConfigError(f"mogu_loss={self.mogu_loss!r}; use one of {', '.join(EXPERT_LOSSES)}.")
        if self.mogu_gate is not None and self.mogu_gate not in GATES:
            raise ConfigError(f"mogu_gate={self.mogu_gate!r}; use one of {', '.join(GATES)}.")
        if self.mogu_gate_positions is not None and self.mogu_gate_positions not in POSITIONS:
            raise ConfigError(f"mogu_gate_positions={self.mogu_gate_positions!r}; use one of {', '.join(POSITIONS)}.")
        if self.mogu_train not in TRAINABLE:
            raise ConfigError(f"mogu_train={self.mogu_train!r}; use one of {', '.join(TRAINABLE)}.")
        if self.mogu_k < 0:
            raise ConfigError(f"mogu_k={self.mogu_k}; routed tokens must be >= 0 (spec: 5).")
        if self.mogu_lambda < 0 or self.mogu_ratio_cap <= 0:
            raise ConfigError("mogu_lambda must be >= 0 and mogu_ratio_cap > 0.")
        if min(self.mogu_expert_epochs, self.mogu_router_epochs, self.mogu_expert_batch, self.mogu_router_batch,
               self.mogu_router_accum) < 1:
            raise ConfigError("MoGU epochs, batch sizes and accumulation must be >= 1.")


@dataclass
class MoGU2Config(MoGUConfig):
    """`mogu2` (reconstruction, mogu.md §2): probe-chosen layers, co-trained backbone, data-mix restore."""

    mogu_layers: str | None = field(default=None, metadata=_h("routed layers, e.g. 10,14,20 (default: top-k by probe accuracy)"))
    mogu_scan: str | None = field(default=None, metadata=_h("a `latentguard scan` output whose probe accuracies choose the layers"))
    mogu_top_k: int | None = field(default=None, metadata=_h("routed layers kept (default max(2, ceil(L/4)))"))
    mogu_scan_n: int = field(default=48, metadata=_h("prompts per side when the layers are scored here (no --mogu-scan)"))
    mogu_backbone: str = field(default="expert_loras", metadata=_h("co-trained with the routers: expert_loras or none"))
    mogu_from: str | None = field(default=None, metadata=_h("IFT mode: a mogu2 run dir; fine-tune it on --data with a LoRA"))
    mogu_mix: float = field(default=0.1, metadata=_h("IFT mode: share of router rows (with gate targets) mixed into --data; 0 = plain IFT"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mogu_backbone not in ("expert_loras", "none"):
            raise ConfigError(f"mogu_backbone={self.mogu_backbone!r}; use expert_loras or none "
                              "(lora_below would change the base path permanently; see docs/mogu.md).")
        if not 0 <= self.mogu_mix < 1:
            raise ConfigError(f"mogu_mix={self.mogu_mix}; use a share in [0, 1) (spec: 0.05-0.2).")
        if self.mogu_top_k is not None and self.mogu_top_k < 1:
            raise ConfigError(f"mogu_top_k={self.mogu_top_k}; keep at least one layer.")
        if self.mogu_layers is not None:
            try:
                [int(x) for x in self.mogu_layers.split(",") if x.strip()]
            except ValueError as e:
                raise ConfigError(f"mogu_layers={self.mogu_layers!r}; write layer indices like 10,14,20.") from e


# ---------------------------------------------------------------- pure loss functions


def response_ce(log_probs: Tensor, labels: Tensor, n_suffix: int = 0) -> Tensor:
    """Per-row token-mean NLL over the response, leaving out its last `n_suffix` tokens (the template's end)."""
    mask = labels[:, 1:] != -100
    if n_suffix:
        from_end = mask.flip(1).cumsum(1).flip(1)  # 1 on a row's last response token, 2 on the one before, ...
        mask = mask & (from_end > n_suffix)
    m = mask.to(log_probs.dtype)
    return -(log_probs * m).sum(1) / m.sum(1).clamp(min=1)


def expert_loss(ce_t: Tensor, ce_c: Tensor, kind: str, cap: float = 5.0, margin: float = 3.0, weight: float = 1.0) -> Tensor:
    """Stage-1 loss over rows (mogu.md §1.3 and pitfall 3)."""
    if kind == "ratio":
        return (ce_t / ce_c).mean()
    if kind == "ratio_clamped":
        return (ce_t / ce_c.clamp(max=cap)).mean()
    if kind == "margin":
        return (ce_t + weight * torch.relu(margin - ce_c)).mean()
    raise ConfigError(f"expert loss {kind!r}; use one of {', '.join(EXPERT_LOSSES)}.")


def gate_loss(wu: Tensor, wg: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """mean(w_u − y)² + mean(w_g − (1 − y))² over layers and masked positions; wu, wg [L, B, T], y [B], mask [B, T]."""
    m = mask.to(wu.dtype).unsqueeze(0).expand_as(wu)
    yb = y.to(wu.dtype)[None, :, None]
    n = m.sum().clamp(min=1)
    return (((wu - yb) ** 2) * m).sum() / n + (((wg - (1 - yb)) ** 2) * m).sum() / n


def template_lengths(tok: Any) -> tuple[int, int]:
    """(tokens the chat template puts before the user text, tokens it puts after the assistant text)."""
    user = [{"role": "user", "content": _PLACEHOLDER}]
    before = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True).split(_PLACEHOLDER)[0]
    full = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PLACEHOLDER}],
                                   tokenize=False)
    after = full.split(_PLACEHOLDER)[1]
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    return len(enc(before)), len(enc(after))


def _tokenize_pair(tok: Any, prompt: str, response: str, max_length: int | None) -> tuple[list[int], int]:
    """(ids, prompt length) exactly as trl tokenises a conversational prompt-completion row."""
    user = [{"role": "user", "content": prompt}]
    p = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False),
               add_special_tokens=False)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
    return (full[:max_length] if max_length else full), n


def _source_rows(cfg: TrainConfig) -> list[tuple[Path | None, int]]:
    """(JSONL path or None, row count) per --data source, in train()'s order (lg_index runs across them)."""
    out: list[tuple[Path | None, int]] = []
    for d in cfg.data:
        spec = parse_data_spec(d)
        path = Path(spec.source)
        n = len(load_spec(spec, cfg.data_dir, cfg.prompt_column, cfg.response_column))
        out.append((path if path.is_file() and path.suffix == ".jsonl" else None, n))
    return out


def _column(cfg: TrainConfig, name: str, default: Any) -> list[Any]:
    """Column `name` of every training row in lg_index order; `default` for rows of other sources."""
    from latentguard.training.mogu_data import read_jsonl

    values: list[Any] = []
    for path, n in _source_rows(cfg):
        values += [r.get(name, default) for r in read_jsonl(path)] if path else [default] * n
    return values


# ---------------------------------------------------------------- stage methods


@METHODS.register("mogu_expert")
class MoGUExpertMethod(TrainingMethod):
    """Stage 1: one expert (PEFT LoRA) with the ratio / clamped / margin loss over its contrast responses."""

    config_cls = MoGUConfig
    replaces_ce = True

    def setup(self, loaded: LoadedModel) -> None:
        cfg: Any = self.config
        tok = loaded.tokenizer
        self.n_suffix = 0 if cfg.mogu_eos else template_lengths(tok)[1]
        contrasts = _column(cfg, "contrast", None)
        missing = [i for i, c in enumerate(contrasts) if not c]
        if missing:
            raise ConfigError(f"mogu_expert needs a 'contrast' response on every row (row {missing[0]} has none); "
                              "pass the glad.jsonl / unwill.jsonl written by `latentguard train --method mogu`.")
        prompts = _column(cfg, "prompt", "")
        self.contrast = [_tokenize_pair(tok, p, c, cfg.max_length) for p, c in zip(prompts, contrasts, strict=True)]
        self.pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self._last: dict[str, float] = {}

    def _contrast_batch(self, index: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        rows = [self.contrast[int(i)] for i in index]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for b, (seq, n_prompt) in enumerate(rows):  # right padding, like trl's collator
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            labels[b, n_prompt: len(seq)] = ids[b, n_prompt: len(seq)]
        return ids.to(device), mask.to(device), labels.to(device)

    def loss_terms(self, hidden: dict[str, Tensor], batch: TrainBatch, model: nn.Module) -> dict[str, Tensor]:
        cfg: Any = self.config
        if batch.log_probs is None:
            raise ConfigError("mogu_expert needs the label log-probabilities of the forward; run it through train().")
        ce_t = response_ce(batch.log_probs, batch.labels, self.n_suffix)
        ids, mask, labels = self._contrast_batch(batch.index, batch.input_ids.device)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True)
        ce_c = response_ce(out.log_probs, labels, self.n_suffix)
        self._last = {"ce_target": float(ce_t.detach().mean()), "ce_contrast": float(ce_c.detach().mean())}
        return {"mogu_expert": expert_loss(ce_t, ce_c, cfg.mogu_loss, cfg.mogu_ratio_cap, cfg.mogu_margin,
                                           cfg.mogu_margin_weight)}

    def metrics(self) -> dict[str, float]:
        return self._last


class _Detach(TrainerCallback):
    """Swaps the original out-projections back when training ends (before the final save)."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.stack.close()


@METHODS.register("mogu_router")
class MoGURouterMethod(TrainingMethod):
    """Stage 2 (and v2's IFT / restore): routers on the MoGU wrappers, CE + λ·gate supervision."""

    config_cls = MoGUConfig
    replaces_ce = True

    def setup(self, loaded: LoadedModel) -> None:
        cfg: Any = self.config
        if not cfg.mogu_init:
            raise ConfigError("mogu_router needs --mogu-init DIR (a MoGU artefact holding the experts).")
        self.modules, self.artifact = load_mogu(cfg.mogu_init, loaded.info)
        prefix, suffix = template_lengths(loaded.tokenizer)
        self.n_suffix = 0 if cfg.mogu_eos else suffix
        self.prefix = prefix if (cfg.mogu_gate_positions or "all") == "from_instruction" else 0
        self.labels = torch.tensor([int(v) for v in _column(cfg, "label", 0)], dtype=torch.float32)
        self.state = MoGUState(mode="mix", record=True)
        self._stack = contextlib.ExitStack()
        self._last: dict[str, float] = {}

    def add_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        cfg: Any = self.config
        self.modules.requires_grad_(False)
        self._stack.enter_context(attach_mogu(model, self.modules, self.state))
        if cfg.mogu_train == "routers":
            return {"mogu_routers": self.modules.routers()}
        return {"mogu": self.modules} if cfg.mogu_train == "routers+experts" else {}

    def callbacks(self) -> list[TrainerCallback]:
        return [_Detach(self._stack)]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """The MoGU modules at the router lr; a backbone LoRA (IFT) at --lr."""
        cfg: Any = self.config
        mogu = {id(p) for p in self.modules.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) in mogu], "lr": cfg.mogu_router_lr},
                  {"params": [p for p in trainable if id(p) not in mogu]}]
        return [g for g in groups if g["params"]]

    def loss_terms(self, hidden: dict[str, Tensor], batch: TrainBatch, model: nn.Module) -> dict[str, Tensor]:
        cfg: Any = self.config
        if batch.log_probs is None:
            raise ConfigError("mogu_router needs the label log-probabilities of the forward; run it through train().")
        terms = {"ce": response_ce(batch.log_probs, batch.labels, self.n_suffix).mean()}
        gates = [self.state.gates[l] for l in self.modules.layout["layers"]]
        wu = torch.stack([g[0][..., 0] for g in gates])  # [L, B, T]
        wg = torch.stack([g[1][..., 0] for g in gates])
        y = self.labels[batch.index.cpu()].to(wu.device)
        mask = batch.attention_mask.bool()
        mask[:, : self.prefix] = False  # from_instruction: the template's opening is the same for both labels
        if cfg.mogu_lambda > 0:
            terms["gate_mse"] = cfg.mogu_lambda * gate_loss(wu, wg, y, mask)
        with torch.no_grad():
            at = mask.float().unsqueeze(0)
            per_row = (wu * at).sum((0, 2)) / at.sum((0, 2)).clamp(min=1) / len(gates)
            self._last = {"w_u_harmful": float(per_row[y > 0.5].mean()) if bool((y > 0.5).any()) else float("nan"),
                          "w_u_benign": float(per_row[y <= 0.5].mean()) if bool((y <= 0.5).any()) else float("nan"),
                          "w_sum": float(((wu + wg) * at).sum() / (at.sum() * len(gates)).clamp(min=1))}
        return terms

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self._last.items() if not math.isnan(v)}  # NaN: a batch without that class


# ---------------------------------------------------------------- drivers


@METHODS.register("mogu")
class MoGUMethod(TrainingMethod):
    """MoGU v1: glad + unwill LoRA experts on every layer's out-projection, then v1 routers (mogu.md §1)."""

    config_cls = MoGUConfig

    def run(self) -> Any:
        from latentguard.training.mogu import run_mogu

        return run_mogu(cast(MoGUConfig, self.config), "mogu")


@METHODS.register("mogu2")
class MoGU2Method(TrainingMethod):
    """MoGU_v2 (reconstruction): routers on probe-chosen layers, co-trained experts; --mogu-from: IFT + data-mix restore."""

    config_cls = MoGU2Config

    def run(self) -> Any:
        from latentguard.training.mogu import run_mogu

        return run_mogu(cast(MoGU2Config, self.config), "mogu2")
