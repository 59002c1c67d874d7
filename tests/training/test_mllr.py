"""ML-LR on the tiny Llama: units map every LoRA parameter once, the perturb scorer restores the
weights, the optimizer's groups carry the intended learning rates (λ = 0 freezes, λ = 1 = plain
training), the multiplier mapping, `analyze modules` output, and the bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import set_seed

from latentguard.artifacts import Artifact
from latentguard.cli.main import main
from latentguard.directions.modules import (
    ModuleData,
    ModuleScoreConfig,
    make_units,
    perturbed,
    score_modules,
    unit_modules,
)
from latentguard.errors import ConfigError
from latentguard.models import load_model
from latentguard.training import TrainConfig, train
from latentguard.training.config import parse_lora
from latentguard.training.methods.mllr import MLLRConfig, MLLRMethod, lr_multipliers
from latentguard.training.run import wrap_lora

ROBUST = {"q@0-0", "v@1-1", "o@0-0"}


def _scores(path, tiny_dir, robust=ROBUST):
    """A hand-made module_scores artefact: 4 roles x 2 one-layer groups, drift by name."""
    info = load_model(str(tiny_dir)).info
    units = make_units(2, ["q", "k", "v", "o"], 1)
    drift = {u.name: (0.01 if u.name in robust else 0.5) + 0.001 * i for i, u in enumerate(units)}
    meta = {"units": [{"name": u.name, "role": u.role, "layers": list(u.layers), "drift": drift[u.name],
                       "robustness": -drift[u.name], "robust": u.name in robust} for u in units],
            "robust": sorted(robust), "tau": 0.25, "scorer": "perturb"}
    Artifact(kind="module_scores", tensors={"drift": torch.tensor(list(drift.values()))}, meta=meta).save(path, model=info)
    return path


def _cfg(tmp_path, tiny_dir, pairs_file, scores, name="run", **kw) -> MLLRConfig:
    base = {"output_dir": str(tmp_path / name), "model": str(tiny_dir), "data": [str(pairs_file)], "method": "mllr",
            "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_steps": 100, "seed": 0,
            "disable_tqdm": True, "plot": False, "lora": "r=4,alpha=8,targets=q,k,v,o", "mllr_scores": str(scores),
            "lr_scheduler_type": "constant"}
    return MLLRConfig(**{**base, **kw})


def _names_by_lr(model, opt) -> dict[float, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["initial_lr"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


def _unit_of(name: str) -> str:
    layer = name.split(".layers.")[1].split(".")[0]
    role = next(r for r in ("q", "k", "v", "o") if f".{r}_proj." in name)
    return f"{role}@{layer}-{layer}"


def test_every_lora_parameter_maps_to_exactly_one_unit(tiny_llama):
    model = wrap_lora(tiny_llama, parse_lora("r=4,alpha=8,targets=q,k,v,o"))
    units = make_units(2, ["q", "k", "v", "o"], 1)
    owners: dict[int, list[str]] = {}
    for u in units:
        for m in unit_modules(model.get_base_model(), u):
            for n, p in m.named_parameters():
                if "lora_" in n:
                    owners.setdefault(id(p), []).append(u.name)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 16 and all(len(owners.get(id(p), [])) == 1 for p in lora)
    assert [u.name for u in make_units(30, ["q"])] == [f"q@{s}-{min(s + 3, 29)}" for s in range(0, 30, 4)]


def test_perturb_scorer_restores_the_weights_even_after_an_error(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    mods = unit_modules(tiny_llama, make_units(2, ["q", "o"], 2)[0])
    with perturbed(mods, 0.05, seed=0):
        assert not torch.equal(mods[0].weight, before["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(RuntimeError, match="boom"), perturbed(mods, 0.05, seed=1):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


def test_param_groups_carry_the_intended_learning_rates(tmp_path, tiny_dir, pairs_file):
    scores = _scores(tmp_path / "scores", tiny_dir)
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_lambda=0.1))
    model, opt = res.trainer.model, res.trainer.optimizer
    groups = _names_by_lr(model, opt)
    assert sorted(groups) == pytest.approx([1e-3, 1e-2])
    fast, slow = groups[max(groups)], groups[min(groups)]
    assert {_unit_of(n) for n in fast} == ROBUST and len(fast) == 2 * len(ROBUST)  # lora_A + lora_B per module
    assert {_unit_of(n) for n in slow} == {"k@0-0", "k@1-1", "q@1-1", "v@0-0", "o@1-1"}
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 1e-3])  # constant schedule: still the initial rates
    art = Artifact.load(tmp_path / "run/method", expect="module_scores")
    assert art.meta["multipliers"]["q@0-0"] == 1.0 and art.meta["multipliers"]["k@0-0"] == 0.1


def test_lambda_zero_freezes_the_rest_and_lambda_one_is_plain_training(tmp_path, tiny_dir, pairs_file):
    scores = _scores(tmp_path / "scores", tiny_dir)
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, scores, name="l0", mllr_lambda=0.0, max_steps=3))
    model = res.trainer.model
    frozen = [(n, p) for n, p in model.named_parameters() if "lora_" in n and _unit_of(n) not in ROBUST]
    assert frozen and all(not p.requires_grad for _, p in frozen)
    assert all(p.abs().max() == 0 for n, p in frozen if "lora_B" in n)  # B starts at 0 and never moved
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n and _unit_of(n) in ROBUST)
    assert len(res.trainer.optimizer.param_groups) == 1
    set_seed(0)  # the LoRA init draws from the global RNG
    one = train(_cfg(tmp_path, tiny_dir, pairs_file, scores, name="l1", mllr_lambda=1.0, max_steps=2))
    set_seed(0)
    sft = train(TrainConfig(output_dir=str(tmp_path / "sft"), model=str(tiny_dir), data=[str(pairs_file)], max_steps=2,
                            per_device_train_batch_size=4, learning_rate=1e-2, save_steps=100, seed=0, disable_tqdm=True,
                            plot=False, lora="r=4,alpha=8,targets=q,k,v,o", lr_scheduler_type="constant"))
    a = dict(one.trainer.model.named_parameters())
    b = dict(sft.trainer.model.named_parameters())
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a if "lora_" in n)


def test_full_fine_tuning_puts_unit_less_parameters_in_the_slow_group(tmp_path, tiny_dir, pairs_file):
    scores = _scores(tmp_path / "scores", tiny_dir)
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, scores, full=True, lora=TrainConfig.lora, max_steps=1))
    groups = _names_by_lr(res.trainer.model, res.trainer.optimizer)
    fast, slow = groups[max(groups)], groups[min(groups)]
    assert fast == {f"model.layers.{n[2]}.self_attn.{n[0]}_proj.weight" for n in ("q@0-0", "v@1-1", "o@0-0")}
    assert "model.embed_tokens.weight" in slow and "model.layers.0.mlp.down_proj.weight" in slow


def test_lr_multipliers():
    drift = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    assert lr_multipliers(drift, {"a", "b"}, 0.1) == {"a": 1.0, "b": 1.0, "c": 0.1, "d": 0.1}
    assert lr_multipliers(drift, {"a", "b"}, 0.1, invert=True) == {"a": 0.1, "b": 0.1, "c": 1.0, "d": 1.0}
    graded = lr_multipliers(drift, {"a"}, 0.01, "graded")
    assert graded["a"] == 1.0 and graded["d"] == pytest.approx(0.01) and graded["b"] == pytest.approx(0.01 ** (1 / 3))


def test_score_modules_on_the_tiny_model_round_trips(tmp_path, tiny_dir):
    loaded = load_model(str(tiny_dir))
    harm = [f"How do I hurt person {i} with a weapon?" for i in range(12)]
    safe = [f"What is {i} plus {i}?" for i in range(12)]
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    art = score_modules(loaded, ModuleData(harm[:8], safe[:8], harm[8:], safe[8:]), ModuleScoreConfig(min_probe_acc=0.0, seeds=1))
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())
    assert [u["name"] for u in art.meta["units"]] == [u.name for u in make_units(2, ["q", "k", "v", "o"], 1)]
    assert art.meta["proxy_layers"] == [1] and art.meta["robust"]
    assert art.meta["units"][1]["drift"] == 0.0  # q@1-1 sits after the probe at resid_pre.1: no drift
    art.save(tmp_path / "s", model=loaded.info)
    back = Artifact.load(tmp_path / "s", expect="module_scores", model=loaded.info)
    assert torch.equal(back.tensors["drift"], art.tensors["drift"]) and back.meta["robust"] == art.meta["robust"]


def test_analyze_modules_cli_writes_json_plot_and_artefact(tmp_path, tiny_dir, pairs_file):
    files = []
    for name, texts in (("h", [f"How do I hurt person {i}?" for i in range(8)]), ("s", [f"What is {i} plus {i}?" for i in range(8)])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([{"instruction": t} for t in texts]))
        files.append(str(path))
    out = tmp_path / "mods"
    rc = main(["analyze", "modules", "--model", str(tiny_dir), "--harmful", files[0], "--harmless", files[1],
               "--harmful-val", files[0], "--harmless-val", files[1], "--min-probe-acc", "0", "--seeds", "1",
               "--out", str(out)])
    assert rc == 0 and (out / "modules.png").stat().st_size > 1000
    summary = json.loads((out / "modules.json").read_text())
    assert len(summary["units"]) == 8 and summary["robust"]
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, out, max_steps=1))  # the artefact feeds --mllr-scores
    assert set(res.trainer.method.multipliers) == {u["name"] for u in summary["units"]}


def test_bad_inputs(tmp_path, tiny_dir, pairs_file, capsys):
    scores = _scores(tmp_path / "scores", tiny_dir)
    with pytest.raises(ConfigError, match=r"mllr_lambda=1.5; use a value in \[0, 1\]"):
        _cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_lambda=1.5)
    with pytest.raises(ConfigError, match="graded needs mllr_lambda > 0"):
        _cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_mapping="graded", mllr_lambda=0.0)
    with pytest.raises(ConfigError, match="ML-LR has no score source"):
        _cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_scores=None, data_dir=None)
    with pytest.raises(ConfigError, match="module_types='q,x'"):
        _cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_module_types="q,x")
    with pytest.raises(ConfigError, match="belongs to no ML-LR unit"):
        train(_cfg(tmp_path, tiny_dir, pairs_file, scores, lora="r=4,alpha=8,targets=q,v,down"))
    rc = main(["analyze", "modules", "--model", str(tiny_dir), "--harmful", str(pairs_file), "--out", str(tmp_path / "m")])
    assert rc == 2 and "Pass all four" in capsys.readouterr().err


def test_resume_keeps_the_runs_multipliers_and_refuses_other_settings(tmp_path, tiny_dir, pairs_file):
    scores = _scores(tmp_path / "scores", tiny_dir)
    train(_cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_lambda=0.1, max_steps=2, save_steps=1))
    meta = tmp_path / "run" / "method" / "meta.json"
    assert json.loads(meta.read_text())["multipliers"]["k@0-0"] == 0.1
    with pytest.raises(ConfigError, match=r"mllr_lambda=0.1 \(now 0.5\).*same --mllr-\* settings"):
        train(_cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_lambda=0.5, max_steps=3, resume=True))
    res = train(_cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_lambda=0.1, max_steps=3, resume=True))
    assert res.trainer.state.global_step == 3 and sorted(_names_by_lr(res.trainer.model, res.trainer.optimizer)) == \
        pytest.approx([1e-3, 1e-2])
    # restore() takes the saved multipliers, not a recomputation (edit one to tell them apart)
    art = Artifact.load(tmp_path / "run" / "method")
    art.meta["multipliers"]["k@0-0"] = 0.2
    method = MLLRMethod(_cfg(tmp_path, tiny_dir, pairs_file, scores, mllr_lambda=0.1))
    method.restore(art)
    assert method.multipliers["k@0-0"] == 0.2 and method.multipliers["q@0-0"] == 1.0
