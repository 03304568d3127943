"""Which Prefect API a run talks to, and the lmflow-managed Prefect server.

Order: `PREFECT_API_URL` when set; else the server started by `lmflow server
start` when it is running; else Prefect's temporary server (8-9 s per run).
Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from . import processes
from .errors import PrefectServerError
from .home import subdir

DEFAULT_PORT = 4200

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
    pid: int
    create_time: float
    url: str
    log: str
    home: str

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


def _dir() -> Path:
    return subdir("prefect-server")


def _state_file() -> Path:
    return _dir() / "server.json"


def _healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def read_state() -> ServerState | None:
    """The managed server when its process is alive, else None (stale state is removed)."""
    try:
        state = ServerState(**json.loads(_state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None
    try:
        proc = psutil.Process(state.pid)
        if abs(proc.create_time() - state.create_time) < 0.01 and proc.is_running():
            return state
    except psutil.Error:
        pass
    _state_file().unlink(missing_ok=True)
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start(port: int | None = None, timeout: float = 90.0) -> ServerState:
    """Start the managed server in the background (or return the running one)."""
    state = read_state()
    if state is not None:
        return state
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
    elif not _port_free(port):
        raise PrefectServerError(f"port {port} on 127.0.0.1 is in use: choose another with --port")
    home = _dir() / "home"
    log = _dir() / "server.log"
    env = {**os.environ, **QUIET, **SERVER_TUNING, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            _server_command(port),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # outlives `lmflow server start` on purpose
        )
    url = f"http://127.0.0.1:{port}/api"
    state = ServerState(proc.pid, psutil.Process(proc.pid).create_time(), url, str(log), str(home))
    _state_file().write_text(json.dumps(asdict(state)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _state_file().unlink(missing_ok=True)
            raise PrefectServerError(
                f"the Prefect server exited with code {proc.returncode} while starting; see {log}")
        if _healthy(url):
            return state
        time.sleep(0.25)
    stop()
    raise PrefectServerError(f"the Prefect server was not ready within {timeout:g}s; see {log}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(grace: float = 10.0) -> ServerState | None:
    """Stop the managed server and every process of its group; None if none was running."""
    state = read_state()
    if state is None:
        return None
    try:
        os.killpg(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        psutil.Process(state.pid).wait(grace)
    except psutil.TimeoutExpired:
        os.killpg(state.pid, signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass
    _state_file().unlink(missing_ok=True)
    return state


@dataclass
class ApiChoice:
    url: str | None  # None: a temporary server for this run only
    source: str  # "PREFECT_API_URL" | "lmflow server" | "temporary"


def choose_api() -> ApiChoice:
    if os.environ.get("PREFECT_API_URL"):
        return ApiChoice(os.environ["PREFECT_API_URL"], "PREFECT_API_URL")
    state = read_state()
    if state is not None and _healthy(state.url):
        return ApiChoice(state.url, "lmflow server")
    return ApiChoice(None, "temporary")


_configured: ApiChoice | None = None


def configure_environment(verbose: bool = False) -> ApiChoice:
    """Set Prefect's environment before Prefect is imported; returns the API chosen (once)."""
    from .home import home

    global _configured
    if _configured is not None:
        return _configured

    for key, value in QUIET.items():
        if verbose and key == "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL":
            continue
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(home() / "results"))
    choice = choose_api()
    if choice.url:
        os.environ["PREFECT_API_URL"] = choice.url
    _configured = choice
    return choice


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
    env = {**os.environ, **SERVER_TUNING}
    env.pop("PREFECT_API_URL", None)
    proc = processes.spawn(_server_command(port), log_path=log, env=env,
                           label="temporary Prefect server")
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
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
