"""`latentguard list` prints the registries, so the CLI never hard-codes method names."""

from __future__ import annotations

import pytest

from latentguard.cli.main import main


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("defenses", {"add", "ablate", "conditional"}), ("judges", {"keyword", "llm", "direction"}),
     ("attacks", {"none", "radial", "prefix-injection", "base64", "ablate", "harmful-ft"}),
     ("datasets", {"advbench-heldout", "xstest-safe", "gsm8k-test"}), ("methods", {"sft"}),
     ("sites", {"resid_pre", "head_out"}), ("training-sets", {"gsm8k-train", "safety"})],
)
def test_list_prints_registry(kind, expected, capsys):
    assert main(["list", kind]) == 0
    assert expected <= set(capsys.readouterr().out.split())


def test_list_unknown_kind(capsys):
    assert main(["list", "attackz"]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '{defenses|attacks|judges" in err and "'attackz' is not one of" in err
