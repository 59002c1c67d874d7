"""MoGU wrappers on tiny models: forced gates reproduce each PEFT expert, the base mode and k=0 leave the
model alone, after K tokens the base path writes the rest, wrappers and hooks always come off, the
artefact round-trips and is refused on another base; bad parameters name the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from latentguard.artifacts import Artifact
from latentguard.defenses import apply_defenses, build_defense
from latentguard.defenses.mogu import (
    MoGUDefense,
    MoGUModules,
    MoGUState,
    attach_mogu,
    experts_from_peft,
    load_mogu,
    mogu_site,
    routed,
)
from latentguard.errors import ArtifactError, ConfigError
from latentguard.hooks import count_hooks
from latentguard.models import LoadedModel, arch_of, model_info
from tests.conftest import build_tiny

IDS = torch.tensor([[5, 17, 42, 99, 7, 3], [258, 258, 11, 12, 13, 14]])
MASK = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])


def _peft_expert(model, seed, path, rank=4):
    """A PEFT LoRA on the out-projections with random A and B (so it changes the output), saved to `path`."""
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[mogu_site(model)],
                                                         init_lora_weights=False))
    pm.eval()
    pm.save_pretrained(path)
    return pm


def _modules(model, tmp_path, layers=(0, 1), gate="linear"):
    """MoGU modules holding two random PEFT experts, plus the two PEFT models themselves."""
    unwill = _peft_expert(model, 1, tmp_path / "unwill")
    glad = _peft_expert(model, 2, tmp_path / "glad")
    mods = MoGUModules.for_model(model, layers, rank=4, gate=gate)
    for which, path in (("unwill", tmp_path / "unwill"), ("glad", tmp_path / "glad")):
        for l, (a, b, s) in experts_from_peft(path, model, mods.layout["layers"]).items():
            mods.layer(l).set_expert(which, a, b, s)
    return mods, unwill, glad


def _logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, **kw).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forced_gates_reproduce_each_peft_expert(arch, tmp_path):
    model = build_tiny(arch)
    mods, unwill, glad = _modules(model, tmp_path)
    plain = _logits(model)
    for fixed, peft_model in (((1.0, 0.0), unwill), ((0.0, 1.0), glad)):
        with attach_mogu(model, mods, MoGUState(mode="fixed", fixed=fixed)):
            got = _logits(model)
        want = _logits(peft_model)
        assert not torch.allclose(want, plain, atol=1e-3)  # the expert really changes the output
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with attach_mogu(model, mods, MoGUState(mode="base")):
        torch.testing.assert_close(_logits(model), plain, atol=1e-6, rtol=0)
    assert routed(model) == [] and count_hooks(model) == 0


def test_mix_mode_follows_the_formula_and_records_gates(tmp_path):
    model = build_tiny("llama")
    mods, _, _ = _modules(model, tmp_path, layers=(1,))
    state = MoGUState(mode="mix", record=True)
    o_proj = arch_of(model).o_proj_module(model, 1)
    h = torch.randn(2, 3, 64)
    with attach_mogu(model, mods, state):
        wrapper = arch_of(model).o_proj_module(model, 1)
        out = wrapper(h)
        wu, wg = state.gates[1]
    m = mods.layer(1)
    r = m.rank
    want = (wu + wg) * o_proj(h) + wu * (h @ m.A[:r].t() @ m.B[:, :r].t()) + wg * (h @ m.A[r:].t() @ m.B[:, r:].t())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    assert wu.shape == (2, 3, 1) and 0.4 < float(wu.detach().mean()) < 0.6  # N(0, 0.02) init: gates start near 0.5
    assert state.gates == {}  # the recorder is cleared on detach


def _loaded(model, tok):
    return LoadedModel(model=model, tokenizer=tok, info=model_info(model, model_id="tiny"))


def _save(mods, model, path, k=5):
    return mods.to_artifact({"method": "mogu", "k": k}).save(path, model=model_info(model, model_id="tiny"))


def _gen(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=258, eos_token_id=None, **kw)


def _strong(mods, factor=30.0):
    for m in mods.layers.values():
        m.B.data *= factor  # a loud expert, so routed tokens differ from the base model's own
    return mods


def test_after_k_tokens_the_base_path_writes_the_rest(tmp_path, tiny_tokenizer):
    model = build_tiny("llama")
    mods = _strong(_modules(model, tmp_path)[0])
    _save(mods, model, tmp_path / "art")
    loaded = _loaded(model, tiny_tokenizer)
    ids, k, n = IDS[:1], 3, 10
    everywhere = build_defense(f"mogu:{tmp_path / 'art'},mode=unwill,k=all", loaded)
    first_k = build_defense(f"mogu:{tmp_path / 'art'},mode=unwill,k={k}", loaded)
    with apply_defenses(model, [everywhere]):
        routed_all = _gen(model, ids, n)
    with apply_defenses(model, [first_k]):
        out = _gen(model, ids, n)
    plain = _gen(model, ids, n)
    w = ids.shape[1]
    assert torch.equal(out[:, : w + k], routed_all[:, : w + k])  # the first K tokens are MoGU's
    assert not torch.equal(routed_all[:, w:w + k], plain[:, w:w + k])  # ... and differ from the base model's
    continued = _gen(model, out[:, : w + k], n - k)
    assert torch.equal(out, continued)  # then the unmodified base continues from prompt + prefix
    with apply_defenses(model, [build_defense(f"mogu:{tmp_path / 'art'},mode=unwill,k=0", loaded)]):
        assert torch.equal(_gen(model, ids, n), plain)  # K = 0 is the base model
    assert "generate" not in model.__dict__ and routed(model) == [] and count_hooks(model) == 0


def test_keep_cache_routes_prefill_and_first_k_minus_1_steps(tmp_path, tiny_tokenizer):
    model = build_tiny("llama")
    mods, _, _ = _modules(model, tmp_path)
    _save(mods, model, tmp_path / "art")
    d = build_defense(f"mogu:{tmp_path / 'art'},k=3,handoff=keep_cache", _loaded(model, tiny_tokenizer))
    seen: list[bool] = []
    with apply_defenses(model, [d]):
        wrapper = arch_of(model).o_proj_module(model, 0)
        h = wrapper.register_forward_hook(lambda mod, a, o: seen.append(mod.state.active))
        try:
            _gen(model, IDS[:1], 6)
        finally:
            h.remove()
    assert seen == [True, True, True, False, False, False]
    assert count_hooks(model) == 0


def test_batched_first_k_keeps_rows_that_stopped_stopped(tmp_path, tiny_tokenizer):
    model = build_tiny("llama")
    mods = _strong(_modules(model, tmp_path)[0])
    _save(mods, model, tmp_path / "art")
    d = build_defense(f"mogu:{tmp_path / 'art'},mode=unwill,k=3", _loaded(model, tiny_tokenizer))
    with apply_defenses(model, [d]), torch.no_grad():
        full = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=8, do_sample=False, pad_token_id=258)
        eos = int(full[0, IDS.shape[1]])  # make row 0's first routed token its stop token
        out = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=8, do_sample=False,
                             pad_token_id=258, eos_token_id=eos)
    row = out[0, IDS.shape[1]:].tolist()
    assert row[0] == eos and set(row[1:]) <= {258}


def test_wrappers_hooks_and_generate_are_restored_after_an_error(tmp_path, tiny_tokenizer):
    model = build_tiny("llama")
    originals = [arch_of(model).o_proj_module(model, l) for l in (0, 1)]
    mods, _, _ = _modules(model, tmp_path)
    _save(mods, model, tmp_path / "art")
    for spec in ("k=3", "k=3,handoff=keep_cache", "k=all"):
        d = build_defense(f"mogu:{tmp_path / 'art'},{spec}", _loaded(model, tiny_tokenizer))
        with pytest.raises(RuntimeError, match="boom"), apply_defenses(model, [d]):
            assert routed(model) == [0, 1]
            raise RuntimeError("boom")
        assert [arch_of(model).o_proj_module(model, l) for l in (0, 1)] == originals
        assert count_hooks(model) == 0 and "generate" not in model.__dict__


def test_artefact_round_trip(tmp_path, tiny_tokenizer):
    model = build_tiny("gpt2")
    mods, _, _ = _modules(model, tmp_path, layers=(1,), gate="v1")
    _save(mods, model, tmp_path / "art", k=4)
    back, art = load_mogu(tmp_path / "art", model_info(model, model_id="tiny"))
    assert back.layout == mods.layout and art.meta["layout"]["layers"] == [1]
    for (k1, v1), (k2, v2) in zip(mods.state_dict().items(), back.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    with attach_mogu(model, mods, MoGUState()):
        a = _logits(model)
    with attach_mogu(model, back, MoGUState()):
        b = _logits(model)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    d = build_defense(str(tmp_path / "art"), _loaded(model, tiny_tokenizer))  # a bare directory names its defence
    assert isinstance(d, MoGUDefense) and d.k == 4 and d.describe()["layers"] == [1]
    assert art.meta["params"] == mods.counts()


def test_v1_router_parameter_count_matches_the_spec():
    # mogu.md §1.5: SmolLM2-135M (30 layers, d = 576) routers 35,458,620; LoRA pair r=8: 552,960
    mods = MoGUModules(list(range(30)), 576, 576, rank=8, gate="v1")
    assert mods.counts() == {"router": 35_458_620, "experts": 552_960}
    assert MoGUModules([0], 576, 576, gate="linear").counts()["router"] == 2 * 577


def test_routers_attach_only_to_the_chosen_layers(tmp_path):
    model = build_tiny("llama")
    mods = MoGUModules.for_model(model, [-1])
    assert mods.layout["layers"] == [1]
    with attach_mogu(model, mods, MoGUState()):
        assert routed(model) == [1]
    with pytest.raises(ConfigError, match="out of range"):
        MoGUModules.for_model(model, [0, 2])


def test_artefact_for_another_base_is_refused(tmp_path, tiny_tokenizer):
    model, other = build_tiny("llama"), build_tiny("llama", seed=1)
    mods, _, _ = _modules(model, tmp_path)
    _save(mods, model, tmp_path / "art")
    with pytest.raises(ArtifactError, match="fingerprint"):
        build_defense(f"mogu:{tmp_path / 'art'}", _loaded(other, tiny_tokenizer))
    with pytest.raises(ArtifactError, match="not 'mogu'"):
        Artifact(kind="refusal_direction", tensors={"d": torch.zeros(2)}).save(tmp_path / "dir")
        load_mogu(tmp_path / "dir")


@pytest.mark.parametrize(("spec", "match"), [
    ("k=-2", "k >= 0"), ("mode=both", "mode='both'"), ("handoff=never", "handoff='never'"),
    ("k=five", "integer or 'all'"), ("alpha=1", "Unknown MoGU parameter"),
])
def test_bad_parameters_name_the_fix(spec, match, tmp_path, tiny_tokenizer):
    model = build_tiny("llama")
    mods, _, _ = _modules(model, tmp_path)
    _save(mods, model, tmp_path / "art")
    with pytest.raises(ConfigError, match=match):
        build_defense(f"mogu:{tmp_path / 'art'},{spec}", _loaded(model, tiny_tokenizer))


def test_serve_engine_streams_first_k_routing(tmp_path, tiny_tokenizer):
    import asyncio

    from latentguard.serve import Engine, ServeConfig

    model = build_tiny("llama")
    _save(_strong(_modules(model, tmp_path)[0]), model, tmp_path / "art")
    loaded = _loaded(model, tiny_tokenizer)
    spec = f"mogu:{tmp_path / 'art'},mode=unwill,k=3"
    engine = Engine(loaded, ServeConfig(model="tiny"))
    ids = engine.encode_text("Hello there")
    with apply_defenses(model, [build_defense(spec, loaded)]), torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=258)
    new = out[0, len(ids):].tolist()
    want = tiny_tokenizer.decode(new[: new.index(257)] if 257 in new else new, skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)

    async def main():
        (job,) = engine.submit([ids], engine.params(8), engine.resolve_defenses([spec]), stream=True)
        pieces, result = [], None
        async for item in job.events():
            if isinstance(item, str):
                pieces.append(item)
            result = item
        return "".join(pieces), result

    engine.start()
    try:
        streamed, result = asyncio.run(main())
    finally:
        engine.close()
    assert result.text == want and streamed == want
    assert routed(model) == [] and count_hooks(model) == 0 and "generate" not in model.__dict__
