from __future__ import annotations

import pytest

from latentguard.errors import ConfigError
from latentguard.registry import Registry


def test_registry_lookup_and_suggestions():
    reg: Registry[object] = Registry("defense")
    reg.register("ablate")(object)
    reg.register("add")(int)
    assert reg.get("add") is int and reg.names() == ["ablate", "add"] and "add" in reg
    with pytest.raises(ConfigError, match="Unknown defense 'abalte'. Did you mean 'ablate'\\? Known: ablate, add."):
        reg.get("abalte")
    with pytest.raises(ConfigError, match="registered twice"):
        reg.register("add")(float)
