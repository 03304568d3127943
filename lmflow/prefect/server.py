"""Which Prefect API a run talks to, and the lmflow-managed Prefect server.

Order: `PREFECT_API_URL` when set; else the managed server when it runs; else,
for `lmflow run`, the managed server started in the background on first use
(it stops itself after an idle hour), or with `LMFLOW_PREFECT_SERVER=temporary`
a temporary server for that run only (8-9 s per run).

The managed server's process, the one its state file names, is a watchdog
(`python -m lmflow.prefect.server PORT IDLE`) with the Prefect server as its
child: it stops the server on SIGTERM, when its lmflow home is deleted, and, when
it has an idle period, after that long without flow runs. Checking for a server and starting one happen
under a lock file, so two lmflow commands started at once start one server.
Nothing here imports Prefect.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

import httpx
import psutil

from .. import processes
from ..errors import PrefectServerError
from ..home import subdir

DEFAULT_PORT = 4200
#: what `lmflow run` does when no Prefect server runs: `background` (the default) starts the
#: managed server for this and later runs, `temporary` gives each run a server of its own
MODE_SETTING = "LMFLOW_PREFECT_SERVER"
#: how long a server `lmflow run` started may go without flow runs before it stops itself
#: (`1h`, `30m`, `90s`; `0` or `never`: it keeps running)
IDLE_SETTING = "LMFLOW_PREFECT_SERVER_IDLE"
DEFAULT_IDLE = 3600.0
#: the managed server's port when no `--port` is given and it is free (else any free port)
PORT_SETTING = "LMFLOW_PREFECT_SERVER_PORT"
STARTED_BY_RUN = "lmflow run"
STARTED_BY_COMMAND = "lmflow server start"
IN_PROGRESS = ["PENDING", "RUNNING", "CANCELLING", "PAUSED"]
_LOG = logging.getLogger("lmflow")

# Prefect settings lmflow applies unless the user set them: no telemetry, no
# log flood on the terminal (logs still reach the API and the UI), results
# under lmflow's home so cached steps survive between runs.
QUIET = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}
# SQLite stalls on runs with hundreds of tasks unless the recorders batch more.
SERVER_TUNING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
}


@dataclass
class ServerState:
    pid: int  # the watchdog's, the leader of the server's process group
    create_time: float
    url: str
    log: str
    home: str
    database: str | None = None  # its connection URL without a password; None: SQLite in `home`
    started_by: str = STARTED_BY_COMMAND  # or STARTED_BY_RUN: in the background, on first use
    idle_stop: float | None = None  # seconds without flow runs after which it stops; None: never

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


def _dir() -> Path:
    return subdir("prefect-server")


def _state_file() -> Path:
    return _dir() / "server.json"


def _write_state(state: ServerState) -> None:
    partial = _dir() / ".server.json.partial"  # renamed into place: a reader never sees half a file
    partial.write_text(json.dumps(asdict(state)))
    os.replace(partial, _state_file())


@contextmanager
def _locked() -> Iterator[None]:
    """Held while one lmflow checks for the managed server and starts or stops it."""
    with open(_dir() / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def answers(api_url: str) -> bool:
    """Whether the Prefect API at `api_url` answers its health check now."""
    return _healthy(api_url)


def _healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` or one under it listens on `port`: a healthy answer on the port from
    a server someone else started there in the meantime is not the one we started."""
    try:
        root = psutil.Process(pid)
        return any(conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
                   for proc in (root, *root.children(recursive=True))
                   for conn in proc.net_connections("tcp"))
    except psutil.Error:
        return False


def read_state() -> ServerState | None:
    """The managed server when its process is alive, else None.

    A stale state file is left for `start()` and `stop()` to replace under the lock: removing it
    here could remove the state another lmflow has just written."""
    try:
        state = ServerState(**json.loads(_state_file().read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:  # damaged: is the server it named still there?
        state = _running_watchdog()
        if state is not None:
            _LOG.warning(f"lmflow: {_state_file()} cannot be read ({type(exc).__name__}); the Prefect "
                         f"server it named still runs (pid {state.pid}, {state.url}): using that one")
        return state
    try:
        proc = psutil.Process(state.pid)
        if (abs(proc.create_time() - state.create_time) < 0.01 and proc.is_running()
                and proc.status() != psutil.STATUS_ZOMBIE):
            return state
    except psutil.Error:
        pass
    return None


def _running_watchdog() -> ServerState | None:
    """The managed server's watchdog, found by its command line and folder (for a state file that
    was damaged: starting a second server on the same database would leave the first untracked)."""
    folder = str(_dir().resolve())
    for proc in psutil.process_iter(["cmdline", "cwd", "create_time"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[1:3] != ["-m", "lmflow.prefect.server"] or len(cmdline) < 5 or proc.info["cwd"] != folder:
            continue
        try:
            port, idle = int(cmdline[3]), float(cmdline[4])
            database = proc.environ().get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
        except (ValueError, psutil.Error):
            continue
        return ServerState(proc.pid, proc.info["create_time"], f"http://127.0.0.1:{port}/api",
                           str(_dir() / "server.log"), str(_dir() / "home"),
                           redact(database) if database else None,
                           STARTED_BY_RUN if idle else STARTED_BY_COMMAND, idle or None)
    return None


def _state_file_damaged() -> bool:
    try:
        ServerState(**json.loads(_state_file().read_text()))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, TypeError):
        return True
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start(port: int | None = None, timeout: float = 90.0, database: str | None = None, *,
          idle_stop: float | None = None, started_by: str = STARTED_BY_COMMAND,
          on_launch: Callable[[ServerState], None] | None = None) -> ServerState:
    """Start the managed server in the background (or return the running one).

    `database`: a SQLAlchemy URL (`postgresql+asyncpg://user@host:5432/db`) for a server that many
    workers share; default SQLite under lmflow's home. `idle_stop`: seconds without flow runs
    after which it stops itself (None: never). `on_launch` is called with the new server as soon
    as its process is started, before it is ready. Starting a server that `lmflow run` started
    keeps it: its idle stop is turned off.
    """
    with _locked():
        state = read_state()
        if state is not None and _state_file_damaged():
            _write_state(state)  # found by its process: written again, whole
        if state is not None:
            if idle_stop is None and state.idle_stop is not None:
                state.idle_stop = None
                _write_state(state)  # its watchdog reads the state file before stopping anything
            return state
        return _launch(port, timeout, database, idle_stop, started_by, on_launch)


def _preferred_port() -> int:
    value = os.environ.get(PORT_SETTING, "").strip()
    if not value:
        return DEFAULT_PORT
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise PrefectServerError(f"{PORT_SETTING}={value!r} is not a port: set a number such as 4200")
    return int(value)


def _launch(port: int | None, timeout: float, database: str | None, idle_stop: float | None,
            started_by: str, on_launch: Callable[[ServerState], None] | None) -> ServerState:
    """Start the watchdog and its server and wait until it answers; the caller holds the lock."""
    if port is not None:
        if not _port_free(port):
            raise PrefectServerError(f"port {port} on 127.0.0.1 is in use: choose another with --port")
        candidates = [port]
    else:
        preferred = _preferred_port()
        # the preferred port may be taken between the check and the server's bind: then a free one
        candidates = [preferred, _free_port()] if _port_free(preferred) else [_free_port()]
    for candidate in candidates:
        state = _launch_on(candidate, timeout, database, idle_stop, started_by, on_launch)
        if state is not None:
            return state
    raise PrefectServerError(f"port {candidates[-1]} on 127.0.0.1 was taken by another process while "
                             "the Prefect server started: choose another with --port")


#: the servers this process launched, by PID: it outlives us on purpose, but while we live the
#: handle stays referenced (a dropped handle of a running child is a ResourceWarning) and `stop`
#: reaps it
_launched: dict[int, subprocess.Popen] = {}


def _launch_on(port: int, timeout: float, database: str | None, idle_stop: float | None,
               started_by: str, on_launch: Callable[[ServerState], None] | None) -> ServerState | None:
    """The server on `port` once it answers, or None when another process took the port first."""
    home = _dir() / "home"
    log = _dir() / "server.log"
    env = {**os.environ, **QUIET, **SERVER_TUNING, "PREFECT_HOME": str(home), **_own_ui(port)}
    env.pop("PREFECT_API_URL", None)
    if database:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmflow.prefect.server", str(port), f"{idle_stop or 0:g}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=_dir(),
            start_new_session=True,  # outlives the lmflow that starts it, on purpose
        )
    _launched[proc.pid] = proc
    url = f"http://127.0.0.1:{port}/api"
    state = ServerState(proc.pid, psutil.Process(proc.pid).create_time(), url, str(log), str(home),
                        redact(database) if database else None, started_by, idle_stop)
    _write_state(state)
    if on_launch is not None:
        on_launch(state)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _state_file().unlink(missing_ok=True)
            if not _port_free(port):  # someone else listens there now
                return None
            raise PrefectServerError(
                f"the Prefect server exited with code {proc.returncode} while starting; see {log}")
        if _healthy(url) and _listens(proc.pid, port):
            return state
        time.sleep(0.25)
    _stop_group(state.pid)
    _state_file().unlink(missing_ok=True)
    raise PrefectServerError(f"the Prefect server was not ready within {timeout:g}s; see {log}")


def redact(url: str) -> str:
    """A connection URL fit to print: its password replaced by `***`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(grace: float = 10.0) -> ServerState | None:
    """Stop the managed server and every process under it; None if none was running."""
    with _locked():
        state = read_state()
        if state is not None:
            _stop_group(state.pid, grace)
            launched = _launched.pop(state.pid, None)
            if launched is not None:
                launched.wait(grace)  # ours: reaped (it has exited: _stop_group waited for it)
        _state_file().unlink(missing_ok=True)
        return state


def _stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM to the process group `pid` leads (a watchdog stops its server in turn), then
    SIGKILL to whatever under `pid` is still alive."""
    try:
        leader = psutil.Process(pid)
        procs = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace + 5)  # the watchdog gives its server `grace`
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _last_used_file() -> Path:
    return _dir() / "last-used"


_using: IO[str] | None = None


def _use() -> None:
    """Mark the managed server as used by this process until it exits: a shared lock on a file,
    which the kernel releases however the process ends, so its watchdog never stops the server
    under a run (or `lmflow serve`, or a worker), even between the choice and the flow run."""
    global _using
    if _using is None:
        _using = open(_dir() / "users", "a")  # noqa: SIM115 - held for the life of the process
        fcntl.flock(_using, fcntl.LOCK_SH)
    _last_used_file().touch()


def _in_use() -> bool:
    """Whether a live process holds the managed server (see `_use`)."""
    with open(_dir() / "users", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def last_active(url: str, since: float, timeout: float = 10.0) -> float | None:
    """When the server at `url` last had work (epoch seconds): the latest of `since` (its start),
    the last time an lmflow command chose it, and the end of its last flow run. None while an
    lmflow command uses it or another client's flow run is in progress, or when its API does not
    answer: none of these counts as idle.

    lmflow's own flow runs (tagged `lmflow`) count through their process (`_in_use`): one whose
    process was SIGKILLed stays "Running" in Prefect for good and must not keep the server up."""
    if _in_use():
        return None
    try:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            running = http.post("/flow_runs/filter", json={
                "flow_runs": {"state": {"type": {"any_": IN_PROGRESS}}}, "limit": 200})
            running.raise_for_status()
            if any("lmflow" not in (run.get("tags") or []) for run in running.json()):
                return None
            ended = http.post("/flow_runs/filter", json={
                "flow_runs": {"end_time": {"is_null_": False}}, "sort": "END_TIME_DESC", "limit": 1})
            ended.raise_for_status()
            ends = [datetime.fromisoformat(run["end_time"].replace("Z", "+00:00")).timestamp()
                    for run in ended.json()]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    with suppress(OSError):
        ends.append(_last_used_file().stat().st_mtime)
    return max([since, *ends])


def stops_at(state: ServerState) -> float | None:
    """When a server with an idle stop will stop unless a flow run comes (epoch seconds); None when
    it has no idle stop, runs a flow now, or does not answer."""
    if state.idle_stop is None:
        return None
    since = last_active(state.url, state.create_time)
    return None if since is None else since + state.idle_stop


def background_mode() -> bool:
    """Whether `lmflow run` starts the managed server when no server runs (LMFLOW_PREFECT_SERVER)."""
    value = os.environ.get(MODE_SETTING, "").strip().lower() or "background"
    if value not in ("background", "temporary"):
        raise PrefectServerError(f"{MODE_SETTING}={value!r} is not a choice: set it to `background` "
                                 "(the default: one server for every run) or `temporary` (one per run)")
    return value == "background"


def idle_setting() -> float | None:
    """Seconds without flow runs after which a server `lmflow run` started stops; None: never."""
    from ..spec.model import parse_duration

    value = os.environ.get(IDLE_SETTING, "").strip().lower()
    if not value:
        return DEFAULT_IDLE
    if value in ("never", "off"):
        return None
    try:
        seconds = float(value) if value.replace(".", "", 1).isdigit() else parse_duration(value)
    except ValueError:
        raise PrefectServerError(f"{IDLE_SETTING}={value!r} is not a duration: use e.g. 1h, 30m, 90s, "
                                 "or 0 for never") from None
    return seconds or None


@dataclass
class ApiChoice:
    url: str | None  # None: a temporary server for this run only
    source: str  # "PREFECT_API_URL" | "lmflow server" | "temporary"
    started: ServerState | None = None  # the managed server, when this choice started it


def choose_api() -> ApiChoice:
    """The API a run would use now, starting nothing."""
    if os.environ.get("PREFECT_API_URL"):
        return ApiChoice(os.environ["PREFECT_API_URL"], "PREFECT_API_URL")
    state = read_state()
    if state is not None and _healthy(state.url):
        return ApiChoice(state.url, "lmflow server")
    return ApiChoice(None, "temporary")


def _claim(launch: bool, announce: Callable[[ServerState], None] | None) -> ApiChoice:
    """The managed server, marked as used by this process (`_use`) under the lock its watchdog
    stops it under (so it is either still there to use, or gone); started first when `launch`
    and none runs."""
    idle_stop = idle_setting() if launch else None
    with _locked():
        state = read_state()
        if state is None and launch:
            state = _launch(None, 90.0, None, idle_stop, STARTED_BY_RUN, announce)
            _use()
            return ApiChoice(state.url, "lmflow server", started=state)
        if state is not None and _healthy(state.url, timeout=10.0):  # maybe just started by another
            _use()
            return ApiChoice(state.url, "lmflow server")
    return ApiChoice(None, "temporary")  # none, or one that does not answer: leave it be


_configured: ApiChoice | None = None


def configure_environment(verbose: bool = False, *, start: bool = False,
                          announce: Callable[[ServerState], None] | None = None) -> ApiChoice:
    """Set Prefect's environment before Prefect is imported; returns the API chosen (once).

    `start` (what `lmflow run` asks): with no Prefect server to use, start the managed one in the
    background unless LMFLOW_PREFECT_SERVER=temporary; `announce` is called with it as soon as
    its process is started.
    """
    from ..home import home, shared

    global _configured
    if _configured is not None:
        return _configured

    for key, value in QUIET.items():
        if verbose and key == "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL":
            continue
        os.environ.setdefault(key, value)
    # the step cache, and a distributed map's items (a delayed task's parameters): in the folder every
    # machine shares when LMFLOW_SHARED is set, whatever else said (lmflow.prefect.distributed)
    if shared() is not None:
        os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(shared() / "results")
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(home() / "results"))
    choice = choose_api()
    launch = start and background_mode()  # a wrong setting is an error even when a server runs
    if choice.source == "lmflow server" or (launch and choice.url is None):
        choice = _claim(launch, announce)
    if choice.url:
        os.environ["PREFECT_API_URL"] = choice.url
    _configured = choice
    return choice


def _own_ui(port: int) -> dict[str, str]:
    """The UI asks the API its `/ui-settings` names, which is 127.0.0.1:4200 whatever `--port`
    says unless PREFECT_UI_API_URL is set: a server on another port would show another
    server's runs, or none."""
    return {"PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}


def _server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(port)]


@contextmanager
def temporary_server(timeout: float = 120.0) -> Iterator[str]:
    """A Prefect server for one run, owned by this process.

    Prefect's own temporary server outlives a killed parent; this one is a
    child like the engines (PDEATHSIG, PID registry) and stops with the run.
    """
    port = _free_port()
    log = subdir("logs") / "prefect-temporary-server.log"
    log.write_bytes(b"")
    env = {**os.environ, **SERVER_TUNING, **_own_ui(port)}
    env.pop("PREFECT_API_URL", None)
    proc = processes.spawn(_server_command(port), log_path=log, env=env,
                           label="temporary Prefect server")
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while not (_healthy(url) and _listens(proc.pid, port)):
            if proc.poll() is not None:
                raise PrefectServerError(
                    f"the temporary Prefect server exited with code {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise PrefectServerError(
                    f"the temporary Prefect server was not ready within {timeout:g}s; see {log}")
            time.sleep(0.2)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        if os.environ.get("PREFECT_API_URL") == url:
            del os.environ["PREFECT_API_URL"]
        processes.stop(proc)


#: a server that dies more often than this is not restarted again: something is wrong with it
RESTARTS_ALLOWED, RESTART_WINDOW = 5, 600.0


#: how often the watchdog looks whether its lmflow home still exists (a stat: cheap)
HOME_CHECK_SECONDS = 5.0


def _watch(port: int, idle_stop: float | None) -> int:
    """The watchdog: run the Prefect server as a child (PDEATHSIG: it dies with us), restart it when
    it dies on its own (a run in progress keeps its history: the database outlives the server),
    stop it on SIGTERM, when its lmflow home is deleted, and after `idle_stop` seconds without
    flow runs unless the state file, read each time, says otherwise (`lmflow server start` turns
    the idle stop off)."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    url = f"http://127.0.0.1:{port}/api"
    started = psutil.Process().create_time()
    restarts: list[float] = []
    home = _Home(_dir())
    server = _spawn_server(port)
    try:
        while True:
            if _serve_until_exit_or_idle(server, url, started, idle_stop, home):
                return 0
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW]
            if len(restarts) >= RESTARTS_ALLOWED:
                print(f"lmflow: the Prefect server exited with code {server.returncode}, the "
                      f"{len(restarts) + 1}th time in {RESTART_WINDOW / 60:g} minutes: not restarting it",
                      flush=True)
                return server.returncode or 1
            print(f"{datetime.now():%Y-%m-%d %H:%M:%S} lmflow: the Prefect server exited with code "
                  f"{server.returncode}: restarting it", flush=True)
            restarts.append(now)
            server = _spawn_server(port)
    finally:
        processes.stop(server, grace=10.0)


def _spawn_server(port: int) -> subprocess.Popen:
    return processes.spawn(_server_command(port), log_path=_dir() / "server.log", env=dict(os.environ),
                           label="managed Prefect server")


class _Home:
    """The folder of the watchdog's lmflow home, to notice when it is deleted (or deleted and
    made anew: another home then, whose server this is not)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.identity = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        try:
            found = os.stat(self.folder)  # never `_dir()`: it would make the folder again
        except OSError:
            return None
        return found.st_dev, found.st_ino

    def gone(self) -> bool:
        return self._identity() != self.identity


def _serve_until_exit_or_idle(server: subprocess.Popen, url: str, started: float,
                              idle_stop: float | None, home: _Home) -> bool:
    """Wait until the server exits on its own (False), or was stopped because its home is gone
    or for being idle (True)."""
    every = min(HOME_CHECK_SECONDS, max(0.5, idle_stop / 10)) if idle_stop is not None \
        else HOME_CHECK_SECONDS
    idle_every = min(30.0, max(0.5, idle_stop / 10)) if idle_stop is not None else None
    idle_checked = time.monotonic()
    while True:
        try:
            server.wait(every)  # returns at once when the server dies
            return False
        except subprocess.TimeoutExpired:
            pass
        if home.gone():  # its database and state file went with it: nothing left to serve
            print(f"lmflow: the lmflow home {home.folder.parent} is gone: stopping the Prefect server",
                  flush=True)
            processes.stop(server, grace=10.0)
            return True
        if idle_every is None or time.monotonic() - idle_checked < idle_every:
            continue
        idle_checked = time.monotonic()
        if not _idle_for(url, started, idle_stop):  # type: ignore[arg-type] - idle_every is set: idle_stop is
            continue
        with _locked():  # no lmflow chooses this server while it stops
            state = read_state()
            mine = state is not None and state.pid == os.getpid()
            limit = state.idle_stop if state is not None and mine else idle_stop
            if limit is None or not _idle_for(url, started, limit):
                continue
            print(f"lmflow: no flow runs for {limit:g}s: stopping the Prefect server", flush=True)
            if mine:
                _state_file().unlink(missing_ok=True)
            processes.stop(server, grace=10.0)
        return True


def _idle_for(url: str, started: float, limit: float) -> bool:
    since = last_active(url, started)
    return since is not None and time.time() - since >= limit


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1]), float(sys.argv[2]) or None))
