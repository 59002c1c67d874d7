"""`latentguard serve`: an OpenAI-compatible HTTP server whose requests may pick defences by name."""

from __future__ import annotations

from typing import Any

import click

from latentguard.cli.options import build_config, config_options
from latentguard.models import load_model
from latentguard.serve import Engine, ServeConfig, bind_socket, create_app, run_server

__all__ = ["command"]


@click.command(
    "serve",
    help="Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
    "/v1/models; streaming). A request's `defense` field lists defence specs; --defense sets the "
    "default. SIGINT/SIGTERM finish in-flight requests, then stop.",
)
@config_options(ServeConfig)
@click.option("--defense", "defense", multiple=True,
              help="default defence spec NAME[:ARTEFACT][,k=v] for requests that name none; repeat to compose")
def command(config_file: str | None, defense: tuple[str, ...], **flags: Any) -> int:
    cfg = build_config(ServeConfig, config_file, {**flags, "defense": list(defense) or None})
    loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, chat_template=cfg.chat_template)
    engine = Engine(loaded, cfg)
    sock = bind_socket(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    click.echo(f"serving {engine.model_id} at {url}/v1 (OpenAI-compatible; Ctrl-C stops)")
    run_server(create_app(engine), sock, cfg)
    return 0
