"""MoGU training on the tiny Llama: the losses, the v1 and v2 stage drivers end to end (experts on the
out-projection only, routers trained and experts frozen in v1, co-trained and layer-restricted in v2),
resume, the IFT data-mix restore, and bad inputs (another base, bad K, a layer list out of range)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from latentguard.defenses import build_defense
from latentguard.defenses.mogu import (
    MoGUModules,
    MoGUState,
    attach_mogu,
    experts_from_peft,
    load_mogu,
)
from latentguard.errors import ArtifactError, ConfigError
from latentguard.eval.datasets import shared_data_dir
from latentguard.models import load_model
from latentguard.training import train
from latentguard.training.borderline import borderline_prompts
from latentguard.training.methods.mogu import (
    MoGU2Config,
    MoGUConfig,
    expert_loss,
    gate_loss,
    response_ce,
    template_lengths,
)
from latentguard.training.mogu_data import first_sentence
from latentguard.training.reference_data import normalize, read_eval_sets
from tests.conftest import build_tiny

SMALL = {"mogu_n_harmful": 6, "mogu_n_benign": 6, "mogu_n_borderline": 3, "mogu_n_val": 4, "mogu_answer_tokens": 8, "mogu_response_tokens": 8,
             "mogu_expert_epochs": 2, "mogu_expert_batch": 4, "mogu_router_epochs": 2, "mogu_router_batch": 4, "mogu_router_accum": 1,
             "plot": False}


def _cfg(cls, out, model, method, **kw):
    return cls(output_dir=str(out), model=str(model), method=method, data_dir=str(shared_data_dir()), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("mogu") / "run"
    return train(_cfg(MoGUConfig, out, tiny_dir, "mogu")), out


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("mogu2") / "run"
    return train(_cfg(MoGU2Config, out, tiny_dir, "mogu2", mogu_top_k=1, mogu_scan_n=6)), out


def test_gate_loss_pushes_gates_toward_their_labels():
    torch.manual_seed(0)
    model = build_tiny("llama")
    mods = MoGUModules.for_model(model, [0, 1], gate="linear")
    state = MoGUState(record=True)
    ids = torch.randint(0, 256, (4, 7))
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mask = torch.ones(4, 7, dtype=torch.bool)
    opt = torch.optim.Adam(mods.router_parameters(), lr=0.05)

    def gates():
        model(input_ids=ids)
        return (torch.stack([state.gates[l][i][..., 0] for l in (0, 1)]) for i in (0, 1))

    with attach_mogu(model, mods, state):
        wu, wg = gates()
        first = float(gate_loss(wu, wg, y, mask).detach())
        for _ in range(30):
            wu, wg = gates()
            loss = gate_loss(wu, wg, y, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        wu, wg = gates()
    assert first == pytest.approx(0.5, abs=0.02)  # both gates start near 0.5: 0.25 + 0.25
    assert float(gate_loss(wu, wg, y, mask)) < 0.1 * first
    wu, wg = wu.detach(), wg.detach()
    assert wu[:, y == 1].min() > 0.5 > wu[:, y == 0].max()  # every position on its label's side
    assert wg[:, y == 0].min() > 0.5 > wg[:, y == 1].max()
    assert wu[:, y == 1].mean() > 0.85 and wu[:, y == 0].mean() < 0.15  # Unwill on malicious rows
    assert wg[:, y == 0].mean() > 0.85 and wg[:, y == 1].mean() < 0.15  # Glad on benign rows


def test_response_ce_and_expert_losses():
    lp = -torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])  # log p of labels[:, 1:]
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8]])  # 4 response tokens; the last 2 are the template's end
    assert float(response_ce(lp, labels)) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(response_ce(lp, labels, n_suffix=2)) == pytest.approx((1 + 2) / 2)
    t, c = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 8.0])
    assert float(expert_loss(t, c, "ratio")) == pytest.approx((0.5 + 0.25) / 2)
    assert float(expert_loss(t, c, "ratio_clamped", cap=4.0)) == pytest.approx((0.5 + 0.5) / 2)
    assert float(expert_loss(t, c, "margin", margin=3.0, weight=1.0)) == pytest.approx((1 + 1 + 2) / 2)


def test_first_sentence_skips_list_numbers():
    assert first_sentence("1. Gather the tools. 2. Light it.") == "1. Gather the tools."
    assert first_sentence("I cannot help with that. Sorry.") == "I cannot help with that."
    assert first_sentence("To make it, you need\na pipe") == "To make it, you need"
    assert first_sentence("No end here") == "No end here"


def test_template_lengths_of_chatml(tiny_tokenizer):
    before, after = template_lengths(tiny_tokenizer)
    assert after == len(tiny_tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert before > 0


def test_v1_stages_train_experts_on_the_out_projection_then_routers(v1_run, tiny_dir):
    result, out = v1_run
    assert result.artifact == out / "mogu"
    mods, art = load_mogu(out)
    init, _ = load_mogu(out / "init")
    assert mods.layout["layers"] == [0, 1] and mods.layout["gate"] == "v1" and art.meta["k"] == 5
    for key in load_file(str(out / "glad" / "adapter" / "adapter_model.safetensors")):
        assert ".self_attn.o_proj.lora_" in key  # the experts live on the out-projection only
    for l in (0, 1):  # v1: routers trained, experts frozen
        assert not torch.equal(mods.layer(l).router.unwill.net[0].weight, init.layer(l).router.unwill.net[0].weight)
        assert torch.equal(mods.layer(l).A, init.layer(l).A) and torch.equal(mods.layer(l).B, init.layer(l).B)
    chosen = json.loads((out / "selection.json").read_text())
    loaded = load_model(str(tiny_dir))
    a, b, s = experts_from_peft(chosen["glad"]["chosen"], loaded.model, [0])[0]
    torch.testing.assert_close(mods.layer(0).A[8:], a)  # rows r..2r-1: the chosen Glad checkpoint
    torch.testing.assert_close(mods.layer(0).B[:, 8:], s * b)
    log = [json.loads(line) for line in (out / "glad" / "log.jsonl").read_text().splitlines()]
    assert any("ce_contrast" in r and "mogu_expert" in r for r in log)
    router_log = [json.loads(line) for line in (out / "router" / "log.jsonl").read_text().splitlines()]
    assert any("gate_mse" in r and "ce" in r for r in router_log)
    assert not list((out / "router").glob("checkpoint-*/model.safetensors"))  # --lora none: routers only
    assert build_defense(f"mogu:{out}", loaded).describe()["layers"] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["router"] == summary["params"]["spec_v1_router"]


def test_router_benign_rows_include_borderline_prompts_but_never_xstest(v1_run):
    _, out = v1_run
    router = [json.loads(line) for line in (out / "data" / "router.jsonl").read_text().splitlines()]
    unwill = {json.loads(line)["prompt"] for line in (out / "data" / "unwill.jsonl").read_text().splitlines()}
    borderline = set(borderline_prompts(42))
    extra = [r for r in router if r["prompt"] in borderline]
    assert len(extra) == 3 and all(r["label"] == 0 for r in extra)  # benign label, router data only
    assert not unwill & borderline
    xstest = {normalize(p) for p in read_eval_sets(shared_data_dir()).xstest}
    assert not {normalize(r["prompt"]) for r in router} & xstest
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["rows"]["router_borderline"] == 3 and manifest["rows"]["router"] == 6 + 6 + 3


def test_resume_skips_finished_stages(v1_run, tiny_dir):
    _, out = v1_run
    before = (out / "mogu" / "tensors.safetensors").read_bytes()
    again = train(_cfg(MoGUConfig, out, tiny_dir, "mogu", resume=True))
    assert again.trainer is None and (out / "mogu" / "tensors.safetensors").read_bytes() == before
    with pytest.raises(Exception, match="already exists"):
        train(_cfg(MoGUConfig, out, tiny_dir, "mogu"))


def test_v2_routes_and_trains_only_the_chosen_layers(v2_run):
    _, out = v2_run
    chosen = json.loads((out / "layers.json").read_text())
    assert len(chosen["layers"]) == 1 and len(chosen["probe_test_acc"]) == 2
    layer = chosen["layers"][0]
    mods, art = load_mogu(out)
    init, _ = load_mogu(out / "init")
    assert mods.layout["layers"] == [layer] and mods.layout["gate"] == "linear"
    keys = load_file(str(out / "unwill" / "adapter" / "adapter_model.safetensors"))
    assert keys and all(f".layers.{layer}.self_attn.o_proj." in k for k in keys)
    assert not torch.equal(mods.layer(layer).A, init.layer(layer).A)  # experts co-trained (mogu.md R4)
    assert art.meta["co_trained"] == "experts" and art.meta["gate_positions"] == "from_instruction"
    assert art.meta["trainable"]["router"] < art.meta["trainable"]["spec_v1_router"]


def test_v2_ift_and_data_mix_restore(v2_run, tiny_dir, tmp_path):
    _, src = v2_run
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n"
                            for i in range(8)))
    src_mods, _ = load_mogu(src)
    outs = {}
    for mix in (0.0, 0.2):
        outs[mix] = tmp_path / f"ift{mix}"
        res = train(_cfg(MoGU2Config, outs[mix], tiny_dir, "mogu2", mogu_from=str(src), data=[str(task)], mogu_mix=mix,
                         per_device_train_batch_size=4, max_length=128))
        assert res.artifact == outs[mix] / "mogu"
    tuned = load_model(str(outs[0.2] / "model"))
    base = load_model(str(tiny_dir))
    assert tuned.info.fingerprint != base.info.fingerprint  # the IFT changed the model
    restored, art = load_mogu(outs[0.2] / "mogu", tuned.info)  # re-stamped for the fine-tuned model
    plain, _ = load_mogu(outs[0.0] / "mogu")
    layer = src_mods.layout["layers"][0]
    w = lambda m: m.layer(layer).router.unwill.net[0].weight
    assert torch.equal(w(plain), w(src_mods))  # plain IFT: routers untouched
    assert not torch.equal(w(restored), w(src_mods))  # restore: routers retrained on the mix
    assert art.meta["ift"]["router_rows"] == 2 and art.meta["ift"]["routers_retrained"]
    log = [json.loads(line) for line in (outs[0.2] / "ift" / "log.jsonl").read_text().splitlines()]
    assert any("gate_mse" in r for r in log)


def test_experts_for_another_base_are_refused(v1_run, other_tiny_dir, tmp_path):
    _, out = v1_run
    with pytest.raises(ArtifactError, match="fingerprint"):
        train(MoGUConfig(output_dir=str(tmp_path / "r"), model=str(other_tiny_dir), method="mogu_router", lora="none",
                         data=[str(out / "data" / "router.jsonl")], mogu_init=str(out / "init"), plot=False))
    with pytest.raises(ArtifactError, match="resume it with the same"):
        train(_cfg(MoGUConfig, out, other_tiny_dir, "mogu", resume=True))


def test_bad_inputs_name_the_fix(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="out of range"):
        train(_cfg(MoGU2Config, tmp_path / "a", tiny_dir, "mogu2", mogu_layers="0,7"))
    assert not (tmp_path / "a").exists()  # refused before any work
    with pytest.raises(ConfigError, match="routed tokens must be >= 0"):
        _cfg(MoGUConfig, tmp_path / "b", tiny_dir, "mogu", mogu_k=-1)
    with pytest.raises(ConfigError, match="mogu_gate='big'"):
        _cfg(MoGUConfig, tmp_path / "c", tiny_dir, "mogu", mogu_gate="big")
    with pytest.raises(ConfigError, match="lora_below"):
        _cfg(MoGU2Config, tmp_path / "d", tiny_dir, "mogu2", mogu_backbone="lora_below")
    with pytest.raises(ConfigError, match="needs a 'contrast'"):
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n")
        train(MoGUConfig(output_dir=str(tmp_path / "e"), model=str(tiny_dir), method="mogu_expert", data=[str(rows)],
                         lora="targets=o", plot=False))
    with pytest.raises(ConfigError, match="adds none"):
        train(MoGUConfig(output_dir=str(tmp_path / "f"), model=str(tiny_dir), method="sft", data=[str(rows)],
                         lora="none", plot=False))
