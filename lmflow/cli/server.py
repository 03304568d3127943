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

    already = prefect_server.read_state()
    state = prefect_server.start(port, database=database)
    verb = "already running" if already else "started"
    click.echo(f"Prefect server {verb}: {state.ui_url} (pid {state.pid}, log {state.log}, "
               f"database {state.database or 'SQLite'})")
    if already and already.idle_stop is not None:
        click.echo("it was started by `lmflow run`; it keeps running now, until `lmflow server stop`")


@server.command("stop")
def server_stop() -> None:
    """Stop the managed Prefect server."""
    from ..prefect import server as prefect_server

    state = prefect_server.stop()
    if state:
        click.echo(f"stopped Prefect server (pid {state.pid})")
    else:
        click.echo("no lmflow Prefect server is running")


@server.command("status")
def server_status() -> None:
    """Say whether the managed server runs, and which API `lmflow run` would use."""
    from ..prefect import server as prefect_server

    state = prefect_server.read_state()
    answering = state is not None and prefect_server.answers(state.url)
    if state and answering:
        click.echo(f"running: {state.ui_url} (pid {state.pid}, log {state.log})")
        click.echo(_lifetime(state))
    elif state:
        click.echo(f"not answering: its watchdog (pid {state.pid}) runs, but {state.url} does not "
                   f"answer; it is starting, or restarting after a crash (see {state.log})")
    else:
        click.echo("not running (`lmflow server start` starts it, and so does `lmflow run` when no "
                   "server runs)")
    choice = prefect_server.choose_api()
    if choice.url:
        uses = f"{choice.url} ({choice.source})"
    elif prefect_server.background_mode():
        uses = ("the lmflow server, which it starts in the background "
                f"({prefect_server.MODE_SETTING}=background)")
    else:
        uses = f"a temporary Prefect server per run ({prefect_server.MODE_SETTING}=temporary)"
    click.echo(f"lmflow run uses: {uses}")
    if not answering:
        sys.exit(1)


def _duration(seconds: float) -> str:
    """3600 -> 1h, 5400 -> 1h30m, 90 -> 1m30s, 4 -> 4s."""
    rest, parts = round(seconds), []
    for unit, size in (("h", 3600), ("m", 60)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) + (f"{rest}s" if rest or not parts else "")


def _lifetime(state: ServerState) -> str:
    """How the managed server came to run and when it stops."""
    import time

    from ..prefect import server as prefect_server

    how = ("started by `lmflow run`, in the background" if state.started_by == prefect_server.STARTED_BY_RUN
           else "started by `lmflow server start`")
    if state.idle_stop is None:
        return f"{how}; runs until `lmflow server stop`"
    idle = f"stops by itself after {_duration(state.idle_stop)} without flow runs"
    at = prefect_server.stops_at(state)
    if at is None:
        return f"{how}; {idle} (not idle now: a run is in progress, or it does not answer)"
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    return (f"{how}; {idle}: at {clock} (in {_duration(max(0.0, at - time.time()))}) unless a run "
            "comes; `lmflow server stop` ends it now")


def announce(state: ServerState) -> None:
    """The one line `lmflow run` prints when it starts the managed server."""
    from ..prefect.server import MODE_SETTING

    until = f"{_duration(state.idle_stop)} without runs or " if state.idle_stop else ""
    click.echo(f"lmflow: starting a Prefect server in the background, UI at {state.ui_url}; it keeps "
               f"running for later runs until {until}`lmflow server stop` ({MODE_SETTING}=temporary: "
               "a temporary server per run instead)", err=True)
