"""pytest fixtures that run lmflow's LM Studio stand-in (`lmflow testing serve`) for your own tests.

Registered through the `pytest11` entry point, so any project with lmflow installed has them:

- `lmstudio_server` (session): a server with the installed bundled models and default behaviour;
- `lmstudio_server_factory` (function): `lmstudio_server_factory(api_token="s3cret", ...)` starts
  one more server with these knobs (the keys of `lmflow testing serve --config`, see `Behaviour`),
  stopped at the end of the test. `running_lmstudio_server(directory, **knobs)` does the same for
  a fixture of another scope. With `discoverable=True` the server listens also on a port where
  the `lmstudio` SDK looks for LM Studio, so that `lmstudio.Client()` without a host finds it
  (`RunningServer.sdk_host`); by default it does not (your tests pass `server.host` explicitly,
  and several test sessions on one machine do not compete for the SDK's five ports).

Each server is a real subprocess (`python -m lmflow testing serve`) started like every child of
lmflow (`lmflow.processes.spawn`: its own session, killed if pytest dies), stopped by PID at
teardown with the llama-server children it started. The plugin is loaded by every pytest
run of a project that has lmflow, so this module imports only pytest and the standard library; the
rest waits until a fixture is used.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx

#: seconds a server may take to print its URL (it loads no model before a request asks for one)
START_TIMEOUT = 60.0
#: seconds between SIGTERM and SIGKILL at teardown
STOP_GRACE = 15.0


@dataclass
class RunningServer:
    """A running `lmflow testing serve`: where it listens, what it serves, and helpers for tests."""

    url: str  # http://127.0.0.1:PORT
    api_token: str | None
    process: subprocess.Popen = field(repr=False)
    directory: Path = field(repr=False)  # its config and its output (server.log)
    #: where `lmstudio.Client()` with no host finds it (`127.0.0.1:41343`): for a server started
    #: `discoverable=True` that got one of the SDK's ports, else None
    sdk_host: str | None = None

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, what `lmstudio.Client(...)` takes."""
        return self.url.removeprefix("http://")

    @property
    def pid(self) -> int:
        """The server's process id (its llama-server children are its child processes)."""
        return self.process.pid

    @property
    def models(self) -> list[str]:
        """The keys of the models it serves."""
        return [m["id"] for m in self.request("GET", "/api/v0/models").json()["data"]]  # any rest_api

    @property
    def headers(self) -> dict[str, str]:
        """The `Authorization` header the server wants (none without an api_token)."""
        return {"Authorization": f"Bearer {self.api_token}"} if self.api_token else {}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An HTTP request to the server with its token; raises `httpx.HTTPStatusError` for a 4xx/5xx."""
        import httpx

        response = httpx.request(method, self.url + path, headers=self.headers, timeout=60, **kwargs)
        response.raise_for_status()
        return response

    def loaded(self) -> dict[str, dict[str, Any]]:
        """The instances loaded now: `{instance_id: {"model": key, "context_length": N, "parallel": N}}`
        (asked through REST v1: not on a server with `rest_api: v0`)."""
        models = self.request("GET", "/api/v1/models").json()["models"]
        return {i["id"]: {"model": m["key"], "context_length": i["config"]["context_length"],
                          "parallel": i["config"]["parallel"]}
                for m in models for i in m["loaded_instances"]}

    def unload_all(self) -> list[str]:
        """Unload every loaded instance (through REST v1, as `loaded()`); their ids."""
        unloaded = list(self.loaded())
        for instance_id in unloaded:
            self.request("POST", "/api/v1/models/unload", json={"instance_id": instance_id})
        return unloaded

    def stats(self) -> dict[str, Any]:
        """What the server was asked (`GET /lmflow/stats`): chat_requests, in_flight, max_in_flight, ..."""
        return self.request("GET", "/lmflow/stats").json()

    def reset_stats(self) -> dict[str, Any]:
        """Zero the counters (`POST /lmflow/stats/reset`)."""
        return self.request("POST", "/lmflow/stats/reset").json()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after a grace period; then any llama-server child still alive."""
        _stop(self.process)


def _stop(process: subprocess.Popen) -> None:
    import psutil

    from .. import processes

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    processes.stop(process, grace=STOP_GRACE)
    # the server stops its engines, and on Linux they die with it anyway (PR_SET_PDEATHSIG):
    # this covers a server that had to be killed on a platform without it
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        child.kill()


def _config(knobs: dict[str, Any]) -> dict[str, Any]:
    """The YAML config for these knobs; without `models`, the installed bundled models."""
    from dataclasses import fields

    from .server import Behaviour, installed_models

    known = {f.name for f in fields(Behaviour)}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise TypeError(f"unknown lmstudio_server knob '{unknown[0]}': knobs are {', '.join(sorted(known))}")
    if "models" in knobs:
        return knobs
    return {"models": [{"key": m.key} for m in installed_models()], **knobs}


def _start(directory: Path, discoverable: bool = False, **knobs: Any) -> RunningServer:
    """Start `lmflow testing serve` with these knobs (none: its defaults); files go to `directory`.
    Not discoverable unless asked: a test session's servers leave the SDK's ports to LM Studio."""
    import yaml

    from .. import processes

    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lmflow", "testing", "serve",
               "--discoverable" if discoverable else "--not-discoverable"]
    if knobs:
        config = directory / "lmstudio.yaml"
        config.write_text(yaml.safe_dump(_config(knobs), sort_keys=False))
        command += ["--config", str(config)]
    # a file, not a pipe: a server that logs a lot over a long session never blocks on a full pipe
    log = directory / "server.log"
    process = processes.spawn(command, log_path=log, label="lmstudio_server")
    try:
        url = _url(process, log)
    except BaseException:
        _stop(process)
        raise
    sdk_url = None
    if discoverable:  # printed with the URL, before the server answers anything
        sdk_url = re.search(r"^lmstudio\.Client\(\) finds it at http://(\S+)$",
                            log.read_text(errors="replace"), re.MULTILINE)
    return RunningServer(url, knobs.get("api_token"), process, directory,
                         sdk_host=sdk_url[1] if sdk_url else None)


def _url(process: subprocess.Popen, log: Path) -> str:
    """The URL the server prints once it listens; a pytest failure with its output if it never does."""
    server = f"`lmflow testing serve` (pid {process.pid})"
    deadline = time.monotonic() + START_TIMEOUT
    # its stdout and stderr share the log: the URL is the first line that is one
    while not (url := re.search(r"^(http://\S+)\n", log.read_text(errors="replace"), re.MULTILINE)):
        if process.poll() is not None:
            pytest.fail(f"{server} exited with code {process.returncode} before it listened:\n"
                        f"{log.read_text(errors='replace')}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{server} printed no URL within {START_TIMEOUT:g} s:\n"
                        f"{log.read_text(errors='replace')}", pytrace=False)
        time.sleep(0.02)
    return url[1]


@contextlib.contextmanager
def running_lmstudio_server(directory: Path, discoverable: bool = False, **knobs: Any
                            ) -> Iterator[RunningServer]:
    """A server with these knobs for the `with` block, e.g. in a session fixture of your own;
    `discoverable=True`: also where `lmstudio.Client()` looks (`RunningServer.sdk_host`)."""
    server = _start(directory, discoverable, **knobs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def lmstudio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """An LM Studio stand-in with real inference for the whole session (the installed bundled models)."""
    with running_lmstudio_server(tmp_path_factory.mktemp("lmstudio_server")) as server:
        yield server


@pytest.fixture
def lmstudio_server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """`lmstudio_server_factory(**knobs)` starts a server with these knobs, stopped after the test."""
    with contextlib.ExitStack() as stack:
        numbers = itertools.count(1)

        def start(discoverable: bool = False, **knobs: Any) -> RunningServer:
            directory = tmp_path / f"lmstudio_server{next(numbers)}"
            return stack.enter_context(running_lmstudio_server(directory, discoverable, **knobs))

        yield start
