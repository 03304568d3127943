"""`lmflow server start|stop|status`: the lmflow-managed Prefect server."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..prefect.server import ServerState

from .main import cli


@cli.group()
def server() -> None:
    """The lmflow-managed Prefect server (keeps runs fast and their history in the UI)."""


@server.command("start")
@click.option("--port", type=int, default=None, help="Default 4200, else a free port.")
@click.option("--database", metavar="URL", default=None,
              help="The server's database, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/prefect "
                   "(for many workers; needs asyncpg). Default: SQLite in lmflow's home.")
def server_start(port: int | None, database: str | None) -> None:
    """Start a local Prefect server with its UI in the background."""
    from ..prefect import server as prefect_server
    from ..render.server import started

    already = prefect_server.read_state()
    click.echo(started(prefect_server.start(port, database=database), already))


@server.command("stop")
def server_stop() -> None:
    """Stop the managed Prefect server."""
    from ..prefect import server as prefect_server
    from ..render.server import stopped

    click.echo(stopped(prefect_server.stop()))


@server.command("status")
def server_status() -> None:
    """Say whether the managed server runs, and which API `lmflow run` would use."""
    from ..prefect import server as prefect_server
    from ..render import server as text

    state = prefect_server.read_state()
    answering = state is not None and prefect_server.answers(state.url)
    if state and answering:
        click.echo(text.running(state, state.started_by == prefect_server.STARTED_BY_RUN,
                                prefect_server.stops_at(state)))
    else:
        click.echo(text.not_running(state))
    choice = prefect_server.choose_api()
    background = not choice.url and prefect_server.background_mode()
    click.echo(text.api_used(choice.url, choice.source, background, prefect_server.MODE_SETTING))
    if not answering:
        sys.exit(1)


def announce(state: ServerState) -> None:
    """The one line `lmflow run` prints when it starts the managed server."""
    from ..prefect.server import MODE_SETTING
    from ..render.server import starting

    click.echo(starting(state, MODE_SETTING), err=True)
