"""SafetyLock: folding equals the hook, locks refuse other bases, round-trip, head selection, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from latentguard.defenses import apply_defenses, build_defense
from latentguard.defenses.bake import EXPORT_META
from latentguard.defenses.safetylock import (
    SafetyLockConfig,
    create_lock,
    export_locked,
    fold_lock,
    folded_lock,
    lock_hooks,
    safety_pairs,
)
from latentguard.directions.heads import (
    HeadFit,
    HeadLock,
    build_head_lock,
    collect_answer_heads,
    fit_heads,
    format_answers,
    select_heads,
)
from latentguard.errors import ArtifactError, ConfigError, UnsupportedModelError
from latentguard.hooks import count_hooks, encode_batch
from latentguard.models import LoadedModel, format_prompts, model_info
from tests.conftest import ARCH_NAMES, build_tiny

PROMPTS = [f"prompt {i}: {'tell me about bread' if i % 2 else 'how to pick a lock'}" for i in range(12)]
ROWS = [(f"how do I do bad thing number {i}?", f"Sure, here is how to do bad thing {i}") for i in range(10)]


def _loaded(arch: str, tok, seed: int = 0) -> LoadedModel:
    model = build_tiny(arch, seed)
    return LoadedModel(model, tok, model_info(model, f"tiny-{arch}"))


def _logits(model, tok, prompts=PROMPTS) -> torch.Tensor:
    batch = encode_batch(tok, format_prompts(tok, prompts))
    with torch.no_grad():
        return model(**batch.forward_kwargs(), use_cache=False).logits[batch.attention_mask.bool()]


def _random_lock(loaded: LoadedModel, seed: int = 5) -> HeadLock:
    """A lock with random unit directions on 3 heads of both layers, stamped with `loaded`'s shape."""
    g = torch.Generator().manual_seed(seed)
    info = loaded.info
    L, H, hd = info.n_layers, info.n_heads, info.head_dim
    u = torch.randn(L, H, hd, generator=g)
    fit = HeadFit(score=torch.rand(L, H, generator=g), separation=torch.rand(L, H, generator=g),
                  direction=u / u.norm(dim=-1, keepdim=True), sigma=1 + torch.rand(L, H, generator=g), n_train=6, n_val=4)
    lock = build_head_lock(fit, [(0, 1), (1, 0), (1, 3)], {"default_alpha": 6.0, "method": "safetylock", "defense": "safetylock"})
    lock.meta["model"] = info.as_meta()
    return lock


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_folded_bias_equals_runtime_hook(arch, tiny_tokenizer):
    loaded = _loaded(arch, tiny_tokenizer)
    lock = _random_lock(loaded)
    plain = _logits(loaded.model, tiny_tokenizer)
    with lock_hooks(loaded.model, lock, alpha=4.0):
        hooked = _logits(loaded.model, tiny_tokenizer)
    assert count_hooks(loaded.model) == 0
    with folded_lock(loaded.model, lock, alpha=4.0):
        temporary = _logits(loaded.model, tiny_tokenizer)
    torch.testing.assert_close(_logits(loaded.model, tiny_tokenizer), plain, atol=0, rtol=0)  # bias restored exactly
    edited = fold_lock(loaded.model, lock, alpha=4.0)
    folded = _logits(loaded.model, tiny_tokenizer)
    assert (hooked - plain).abs().max() > 1e-2  # the lock matters
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=0)
    torch.testing.assert_close(temporary, hooked, atol=1e-5, rtol=0)
    assert edited == ["0.o_proj.bias", "1.o_proj.bias"]


def test_alpha_zero_is_identity_and_hooks_go_on_error(tiny_tokenizer):
    loaded = _loaded("llama", tiny_tokenizer)
    lock = _random_lock(loaded)
    plain = _logits(loaded.model, tiny_tokenizer)
    with lock_hooks(loaded.model, lock, alpha=0.0):
        torch.testing.assert_close(_logits(loaded.model, tiny_tokenizer), plain, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), lock_hooks(loaded.model, lock, alpha=1.0):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), folded_lock(loaded.model, lock, alpha=1.0):
        raise RuntimeError("boom")
    assert count_hooks(loaded.model) == 0
    assert all(loaded.model.model.layers[l].self_attn.o_proj.bias is None for l in range(2))


def test_round_trip_through_safetensors(tmp_path, tiny_tokenizer):
    loaded = _loaded("llama", tiny_tokenizer)
    lock = _random_lock(loaded)
    lock.save(tmp_path / "lock", loaded.info)
    back = HeadLock.load(tmp_path / "lock", loaded.info)
    for name in ("heads", "directions", "sigma", "score"):
        a, b = getattr(lock, name), getattr(back, name)
        assert a.keys() == b.keys()
        for l in a:
            assert torch.equal(a[l], b[l]) and a[l].dtype == b[l].dtype
    assert all(torch.equal(lock.grids[k], back.grids[k]) for k in lock.grids)
    assert back.default_alpha == 6.0 and back.meta["K"] == 3 and back.meta["layers"] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "lock").iterdir()) == ["meta.json", "tensors.safetensors"]


def test_lock_from_another_architecture_is_refused_and_a_fine_tune_warns(tmp_path, tiny_tokenizer):
    base = _loaded("llama", tiny_tokenizer)
    _random_lock(base).save(tmp_path / "lock", base.info)
    for arch in ("qwen2", "gpt2"):
        with pytest.raises(ArtifactError, match="was built on a model with model_type=llama"):
            build_defense(f"lock:{tmp_path / 'lock'}", _loaded(arch, tiny_tokenizer))
    finetune = _loaded("llama", tiny_tokenizer, seed=1)  # same shapes, other weights
    with pytest.warns(UserWarning, match="same shapes, applying anyway"):
        defense = build_defense(f"lock:{tmp_path / 'lock'},alpha=2", finetune)
    assert defense.describe()["alpha"] == 2.0 and defense.describe()["mode"] == "hook"
    with pytest.raises(ConfigError, match="Unknown lock parameter"):
        build_defense(f"safetylock:{tmp_path / 'lock'},layer=1", base)
    with pytest.raises(ConfigError, match="mode='x'"):
        build_defense(f"lock:{tmp_path / 'lock'},mode=x", base)


def test_defence_modes_compose_with_steering_order(tmp_path, tiny_tokenizer):
    loaded = _loaded("llama", tiny_tokenizer)
    _random_lock(loaded).save(tmp_path / "lock", loaded.info)
    hook = build_defense(f"{tmp_path / 'lock'},alpha=3", loaded)  # a bare lock dir names its defence
    bias = build_defense(f"lock:{tmp_path / 'lock'},alpha=3,mode=bias", loaded)
    with apply_defenses(loaded.model, [hook]):
        a = _logits(loaded.model, tiny_tokenizer)
    with apply_defenses(loaded.model, [bias]):
        b = _logits(loaded.model, tiny_tokenizer)
    with apply_defenses(loaded.model, [hook, bias]):  # two shifts add up
        twice = _logits(loaded.model, tiny_tokenizer)
    with lock_hooks(loaded.model, hook.lock, alpha=6.0):
        six = _logits(loaded.model, tiny_tokenizer)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(twice, six, atol=1e-5, rtol=0)
    assert count_hooks(loaded.model) == 0


def test_top_k_picks_the_planted_heads():
    g = torch.Generator().manual_seed(0)
    n_pairs, H, hd = 30, 8, 16
    x = torch.randn(2 * n_pairs, 1, H, hd, generator=g)
    y = torch.tensor([1] * n_pairs + [0] * n_pairs)
    signal = torch.zeros(hd)
    signal[0] = 2.5
    for h in (3, 7):
        x[:, 0, h] += torch.where(y[:, None] == 1, signal, -signal)
    fit = fit_heads(x, y, np.arange(2 * n_pairs) % n_pairs, val_fraction=0.4, seed=0, progress=False)
    assert select_heads(fit, 2) == [(0, 3), (0, 7)]
    assert float(fit.direction[0, 3, 0]) > 0.9  # u points from label 0 to label 1
    with pytest.raises(ConfigError, match="k=9"):
        select_heads(fit, 9)


def test_answer_positions_never_include_template_tokens(tiny_tokenizer):
    pairs = [("q one", "A"), ("a longer question here", "a much longer answer with many words in it")]
    ans = format_answers(tiny_tokenizer, pairs, system=None)
    for text, n_p, n_a in zip(ans.texts, ans.n_prompt, ans.n_answer):
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = ids[n_p : n_p + n_a]
        assert tiny_tokenizer.decode(answer_ids) == pairs[ans.texts.index(text)][1]
        assert tiny_tokenizer.decode(ids[len(ids) - ans.n_suffix:]).startswith("<|im_end|>")


def test_create_lock_on_tiny_model(tiny_tokenizer):
    loaded = _loaded("llama", tiny_tokenizer)
    cfg = SafetyLockConfig(n_pairs=6, k=3, r_tokens=3, system="template", batch_size=4)
    lock = create_lock(loaded, safety_pairs(ROWS, 6, seed=0), cfg, progress=False)
    assert lock.n_heads == 3 and lock.meta["dataset"]["n_pairs"] == 6
    assert lock.meta["dataset"]["n_samples"] == 2 * 6 * 3  # every answer has >= 3 tokens
    for l in lock.heads:
        torch.testing.assert_close(lock.directions[l].norm(dim=-1), torch.ones(len(lock.heads[l])))
        assert (lock.sigma[l] > 0).all()
    assert count_hooks(loaded.model) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_export_reloads_with_plain_from_pretrained(arch, tmp_path, tiny_tokenizer):
    loaded = _loaded(arch, tiny_tokenizer)
    lock = _random_lock(loaded)
    with lock_hooks(loaded.model, lock, alpha=3.0):
        hooked = _logits(loaded.model, tiny_tokenizer)
    record = export_locked(loaded, lock, 3.0, tmp_path / "out", prompts=PROMPTS, tolerance=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(reloaded, tiny_tokenizer), hooked, atol=1e-5, rtol=0)
    meta = json.loads((tmp_path / "out" / EXPORT_META).read_text())
    assert meta["bias_flag"] == (None if arch == "gpt2" else "attention_bias") == record["bias_flag"]
    assert meta["apply_s"] < 0.01 and meta["verify"]["max_abs_logit_diff"] <= 1e-5


def test_export_without_the_flag_would_lose_the_bias(tmp_path, tiny_tokenizer):
    """Why the flag matters: a stock loader drops an o_proj.bias the config does not create."""
    loaded = _loaded("llama", tiny_tokenizer)
    lock = _random_lock(loaded)
    with lock_hooks(loaded.model, lock, alpha=3.0):
        hooked = _logits(loaded.model, tiny_tokenizer)
    fold_lock(loaded.model, lock, 3.0)
    loaded.model.save_pretrained(tmp_path / "noflag")
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "noflag", output_loading_info=True)
    assert any("o_proj.bias" in k for k in info["unexpected_keys"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "noflag").eval()
    assert (_logits(reloaded, tiny_tokenizer) - hooked).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_export_refused_where_o_proj_bias_is_hard_coded_off(arch, tmp_path, tiny_tokenizer):
    loaded = _loaded(arch, tiny_tokenizer)
    before = _logits(loaded.model, tiny_tokenizer)
    with pytest.raises(UnsupportedModelError, match="apply it at run time instead"):
        export_locked(loaded, _random_lock(loaded), 3.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    torch.testing.assert_close(_logits(loaded.model, tiny_tokenizer), before, atol=0, rtol=0)  # nothing edited


def test_answer_activations_keep_input_order(tiny_tokenizer):
    loaded = _loaded("llama", tiny_tokenizer)
    pairs = [("a long question with many many words in it", "ok then"), ("q", "a much longer answer than the other"), ("mid q", "m")]
    ans = format_answers(tiny_tokenizer, pairs, system=None)
    x, valid = collect_answer_heads(loaded, ans, r=4, batch_size=2, progress=False)
    for i, pair in enumerate(pairs):
        xi, vi = collect_answer_heads(loaded, format_answers(tiny_tokenizer, [pair], None), r=4, progress=False)
        torch.testing.assert_close(x[i], xi[0], atol=1e-5, rtol=0)
        assert torch.equal(valid[i], vi[0])
    assert valid[2].tolist() == [False, False, False, True]  # "m" is one token: the other slots are prompt tokens
