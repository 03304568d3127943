"""The text of `lmflow server start|stop|status`, and the line `lmflow run` prints when it starts the
managed Prefect server. The commands read the server's state (lmflow.prefect.server) and pass it in."""

from __future__ import annotations

import time
from typing import Protocol


class Server(Protocol):
    """What the text shows of the managed server: lmflow.prefect.server.ServerState."""

    pid: int
    url: str
    log: str
    database: str | None
    idle_stop: float | None

    @property
    def ui_url(self) -> str: ...


def duration(seconds: float) -> str:
    """3600 -> 1h, 5400 -> 1h30m, 90 -> 1m30s, 4 -> 4s."""
    rest, parts = round(seconds), []
    for unit, size in (("h", 3600), ("m", 60)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) + (f"{rest}s" if rest or not parts else "")


def started(state: Server, already: Server | None) -> str:
    """`lmflow server start`: the server now running (`already`: the one that ran before)."""
    verb = "already running" if already else "started"
    text = (f"Prefect server {verb}: {state.ui_url} (pid {state.pid}, log {state.log}, "
            f"database {state.database or 'SQLite'})")
    if already and already.idle_stop is not None:
        text += "\nit was started by `lmflow run`; it keeps running now, until `lmflow server stop`"
    return text


def stopped(state: Server | None) -> str:
    """`lmflow server stop`: the server stopped, if one ran."""
    return f"stopped Prefect server (pid {state.pid})" if state else "no lmflow Prefect server is running"


def running(state: Server, by_run: bool, stops_at: float | None) -> str:
    """`lmflow server status` of a server that answers: where, and how long it keeps running
    (`by_run`: `lmflow run` started it; `stops_at`: when its idle stop comes, epoch seconds)."""
    return (f"running: {state.ui_url} (pid {state.pid}, log {state.log})\n"
            + _lifetime(state, by_run, stops_at))


def _lifetime(state: Server, by_run: bool, at: float | None) -> str:
    """How the managed server came to run and when it stops."""
    how = "started by `lmflow run`, in the background" if by_run else "started by `lmflow server start`"
    if state.idle_stop is None:
        return f"{how}; runs until `lmflow server stop`"
    idle = f"stops by itself after {duration(state.idle_stop)} without flow runs"
    if at is None:
        return f"{how}; {idle} (not idle now: a run is in progress, or it does not answer)"
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    return (f"{how}; {idle}: at {clock} (in {duration(max(0.0, at - time.time()))}) unless a run "
            "comes; `lmflow server stop` ends it now")


def not_running(state: Server | None) -> str:
    """`lmflow server status` of a server that does not answer (`state`: its watchdog runs), or none."""
    if state:
        return (f"not answering: its watchdog (pid {state.pid}) runs, but {state.url} does not "
                f"answer; it is starting, or restarting after a crash (see {state.log})")
    return "not running (`lmflow server start` starts it, and so does `lmflow run` when no server runs)"


def api_used(url: str | None, source: str, background: bool, setting: str) -> str:
    """Which API `lmflow run` would use: `url` (found through `source`), else the managed server it
    starts (`background`) or a temporary one per run, as the `setting` chooses."""
    if url:
        uses = f"{url} ({source})"
    elif background:
        uses = f"the lmflow server, which it starts in the background ({setting}=background)"
    else:
        uses = f"a temporary Prefect server per run ({setting}=temporary)"
    return f"lmflow run uses: {uses}"


def starting(state: Server, setting: str) -> str:
    """The one line `lmflow run` prints when it starts the managed server (`setting`: the one that
    asks for a temporary server per run instead)."""
    until = f"{duration(state.idle_stop)} without runs or " if state.idle_stop else ""
    return (f"lmflow: starting a Prefect server in the background, UI at {state.ui_url}; it keeps "
            f"running for later runs until {until}`lmflow server stop` ({setting}=temporary: "
            "a temporary server per run instead)")
