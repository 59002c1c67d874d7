"""`add` and `ablate` defences built from direction artefacts."""

from __future__ import annotations

import pytest
import torch

from latentguard.artifacts import Artifact
from latentguard.defenses import apply_defenses, build_defense, build_defenses, parse_defense_spec
from latentguard.errors import ConfigError
from latentguard.hooks import count_hooks, encode_batch
from latentguard.models import LoadedModel, format_prompts, model_info
from tests.conftest import build_tiny


@pytest.fixture
def tiny(tiny_tokenizer) -> LoadedModel:
    model = build_tiny("llama")
    return LoadedModel(model, tiny_tokenizer, model_info(model, "tiny"))


def _scan_artifact(tmp_path, loaded: LoadedModel) -> str:
    dirs = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    Artifact("scan_directions", {"directions": dirs}, {"best_layer": 1, "defense": "add"}).save(tmp_path / "d", model=loaded.info)
    return str(tmp_path / "d")


def _logits(loaded: LoadedModel) -> torch.Tensor:
    batch = encode_batch(loaded.tokenizer, format_prompts(loaded.tokenizer, ["hi there", "bake bread"]))
    with torch.no_grad():
        return loaded.model(**batch.forward_kwargs()).logits


def test_spec_parsing(tmp_path, tiny):
    assert parse_defense_spec("add:some/dir,alpha=2,layer=-1") == ("add", "some/dir", {"alpha": "2", "layer": "-1"})
    art = _scan_artifact(tmp_path, tiny)
    assert parse_defense_spec(art) == ("add", art, {})  # a bare artefact dir names its defence
    with pytest.raises(ConfigError, match="write key=value"):
        parse_defense_spec("add:x,alpha")


def test_add_with_alpha_zero_is_identity_and_hooks_are_removed(tmp_path, tiny):
    art = _scan_artifact(tmp_path, tiny)
    plain = _logits(tiny)
    before = count_hooks(tiny.model)
    (zero,) = build_defenses([f"add:{art},alpha=0"], tiny)
    with apply_defenses(tiny.model, [zero]):
        torch.testing.assert_close(_logits(tiny), plain, atol=0, rtol=0)
    (add,) = build_defenses([f"add:{art},alpha=4,layer=0"], tiny)
    with apply_defenses(tiny.model, [add]):
        assert (_logits(tiny) - plain).abs().max() > 1e-3
    assert count_hooks(tiny.model) == before
    assert add.describe()["layer"] == 0 and add.describe()["alpha"] == 4.0


def test_ablate_and_compose_in_order(tmp_path, tiny):
    art = _scan_artifact(tmp_path, tiny)
    ds = build_defenses([f"ablate:{art}", f"add:{art},alpha=2", "none"], tiny)
    assert [d.key for d in ds] == ["ablate", "add"]
    before = count_hooks(tiny.model)
    with pytest.raises(RuntimeError), apply_defenses(tiny.model, ds):
        assert count_hooks(tiny.model) > before
        raise RuntimeError("forced")
    assert count_hooks(tiny.model) == before


def test_bad_defence_specs(tmp_path, tiny):
    art = _scan_artifact(tmp_path, tiny)
    with pytest.raises(ConfigError, match="Unknown defense 'addd'. Did you mean 'add'"):
        build_defense(f"addd:{art}", tiny)
    with pytest.raises(ConfigError, match="Layer 99 is out of range for a model with 2 layers"):
        build_defense(f"add:{art},layer=99", tiny)
    with pytest.raises(ConfigError, match="alpha=inf is not finite"):
        build_defense(f"add:{art},alpha=inf", tiny)
    with pytest.raises(ConfigError, match="needs a direction artefact"):
        build_defense("add", tiny)
    with pytest.raises(ConfigError, match="Unknown steering parameter"):
        build_defense(f"add:{art},beta=1", tiny)


def test_direction_from_another_model_is_refused(tmp_path, tiny, tiny_tokenizer):
    other = build_tiny("llama", seed=5)
    other_loaded = LoadedModel(other, tiny_tokenizer, model_info(other, "other"))
    art = _scan_artifact(tmp_path, other_loaded)
    with pytest.raises(Exception, match="rebuild it on this model"):
        build_defense(f"add:{art}", tiny)


def test_a_direction_of_another_model_needs_any_model(tmp_path, tiny, tiny_tokenizer):
    """The base's direction on its fine-tune: refused by fingerprint unless any_model=1, then applied with a warning."""
    from latentguard.attacks import attack_config
    from latentguard.attacks.ablate import AblateAttack
    from latentguard.errors import ArtifactError

    art = _scan_artifact(tmp_path, tiny)
    other_model = build_tiny("llama", seed=1)
    other = LoadedModel(other_model, tiny_tokenizer, model_info(other_model, "tiny-other"))
    assert other.info.fingerprint != tiny.info.fingerprint
    for spec in (f"add:{art},alpha=4", f"ablate:{art}", f"conditional:{art},threshold=0.1"):
        with pytest.raises(ArtifactError, match="fingerprint"):
            build_defense(spec, other)
    plain = _logits(other)
    with pytest.warns(UserWarning, match="applying anyway"):
        defense = build_defense(f"add:{art},alpha=4,any_model=1", other)
    with apply_defenses(other.model, [defense]):
        assert not torch.allclose(_logits(other), plain)
    with pytest.warns(UserWarning, match="applying anyway"):
        build_defense(f"conditional:{art},threshold=0.1,any_model=1", other)
    with pytest.raises(ConfigError, match="any_model='maybe' is not a valid switch; pass 1 or 0"):
        build_defense(f"add:{art},any_model=maybe", other)
    assert attack_config(AblateAttack, {"any_model": "1"}).any_model is True
