"""ServeConfig validation and the `latentguard serve` command's one-line errors (exit 2)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from latentguard.cli.main import main
from latentguard.errors import ConfigError
from latentguard.serve import ServeConfig


@pytest.mark.parametrize(("settings", "phrase"), [
    ({"max_batch_size": 0}, "max_batch_size=0; pass a positive integer"),
    ({"queue_size": -1}, "queue_size=-1"),
    ({"port": 70000}, "port=70000 is out of range"),
    ({"default_max_tokens": 600}, "default_max_tokens=600 is outside 1..max_tokens_limit=512"),
    ({"defense": "add:dir"}, "must be a list of spec strings"),
    ({"dtype": "float8"}, "dtype='float8' is unknown"),
    ({"log_level": "loud"}, "log_level='loud' is unknown"),
])
def test_config_rejects_bad_settings(settings, phrase):
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        ServeConfig(**settings)


def test_cli_reports_bad_flags_in_one_line(capsys):
    assert main(["serve", "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: max_batch_size=0") and err.count("\n") == 1


def test_cli_yaml_config_and_unknown_default_defense(tiny_model_dir: Path, tmp_path: Path, capsys):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nport: 0\ndefense: ['nope:somewhere']\n")
    assert main(["serve", "--config", str(cfg)]) == 2  # defences are built before the socket opens
    assert "Unknown defense 'nope'" in capsys.readouterr().err
    cfg.write_text("max_batch: 4\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "Unknown settings ['max_batch']" in capsys.readouterr().err


def test_cli_reports_a_port_in_use(tiny_model_dir: Path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_model_dir), "--port", str(port)]) == 2
    assert f"Cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
