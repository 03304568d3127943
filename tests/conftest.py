"""Shared fixtures: isolated homes, a real llama-server engine, a real Prefect server, and the LM
Studio stand-in (through the pytest plugin lmflow ships to users).

Every process lmflow or these fixtures start is stopped by PID at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

if TYPE_CHECKING:
    from click.testing import Result

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
T = TypeVar("T")

_to_close: list = []


def closing(resource: T) -> T:
    """`resource` (a backend, a client), closed at the end of the test that made it, also when the
    test fails before it closes it itself: a leaked socket would fail whichever later test the
    garbage collector happens to run in (ResourceWarning is an error here)."""
    _to_close.append(resource)
    return resource


@pytest.fixture(autouse=True)
def _close_what_the_test_opened() -> Iterator[None]:
    yield
    while _to_close:
        _to_close.pop().close()


def engine_available() -> bool:
    try:
        from lmflow.backends.catalog import llama_server_binary, locate

        llama_server_binary()
        locate("smollm2-135m-instruct", Path("/nonexistent"))
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One LMFLOW_HOME/PREFECT_HOME for the session (Prefect server state lives there)."""
    home = tmp_path_factory.mktemp("lmflow-home")
    os.environ["LMFLOW_HOME"] = str(home / "lmflow")
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)
    return home


@pytest.fixture(autouse=True)
def isolated_home(session_home: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own lmflow home: run records, journals, probe registry, response cache,
    engine logs and PID files (the Prefect server, and the servers of session fixtures, are shared)."""
    home = tmp_path_factory.mktemp("home") / "lmflow"
    home.mkdir()
    # one Prefect server per machine, as users have it: the session's, found where lmflow looks
    shared = session_home / "lmflow" / "prefect-server"
    shared.mkdir(parents=True, exist_ok=True)
    (home / "prefect-server").symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("LMFLOW_HOME", str(home))
    return tmp_path


@pytest.fixture(scope="session")
def prefect_api(session_home: Path) -> Iterator[str]:
    """A real Prefect server started the way users start it: `lmflow server start`."""
    from lmflow.backends.local import free_port
    from lmflow.prefect import server as prefect_server

    # never 4200: the UI must talk to its own server on any port (and a user's server may be there)
    state = prefect_server.start(port=free_port())
    try:
        yield state.url
    finally:
        prefect_server.stop()


@pytest.fixture(scope="session")
def engine(session_home: Path) -> Iterator[object]:
    """A real llama-server with SmolLM2-135M, started once per session by LocalBackend."""
    if not engine_available():
        pytest.fail("the local engine is not installed: run `make install-dev`")
    from lmflow.backends.local import LocalBackend
    from lmflow.spec.model import ModelConfig, ServerConfig

    backend = LocalBackend(ServerConfig(name="default"))
    model = ModelConfig(alias="session_engine", key="smollm2-135m-instruct", context_length=1024)
    backend.load(model)
    try:
        yield backend, model
    finally:
        backend.close()


def lmflow_cmd(*args: str, env: dict[str, str] | None = None, timeout: float = 180,
               cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the installed `lmflow` command for real."""
    return subprocess.run([str(BIN / "lmflow"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


class _Main:
    """`lmflow.cli.main`, the installed command's entry point, in the shape CliRunner invokes."""

    name = "lmflow"

    @staticmethod
    def main(args: list[str], prog_name: str | None = None, **_: object) -> None:
        from lmflow.cli import main

        main(list(args))


def lmflow_in_process(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Result:
    """`lmflow ARGS` run in this process by click's CliRunner, through `main`: the messages and exit
    codes users get, not click's own. `env` is set on top of this process's environment for the
    call, in `cwd`; an error `main` does not turn into an exit code fails the test. For quick
    commands that leave no state behind in the process (no Prefect settings, no child processes):
    a test about processes, signals, the environment at start-up or an install runs `lmflow_cmd`."""
    from click.testing import CliRunner

    sigterm = signal.getsignal(signal.SIGTERM)  # main turns SIGTERM into SystemExit, for its own process
    before = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(_Main, list(args), env=env, catch_exceptions=False)  # type: ignore[arg-type]
    finally:
        os.chdir(before)
        signal.signal(signal.SIGTERM, sigterm)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


#: the models of the LM Studio stand-in most tests use (`running_lmstudio_server(dir, models=MODELS)`,
#: `lmstudio_server_factory(models=MODELS, ...)`)
MODELS = [
    # declares 8192, loads at most 3072, clamps silently
    {"key": "smollm2-135m-instruct", "max_context_length": 8192, "loadable_context_length": 3072,
     "clamp": True},
    # declares 8192, fails above 2048
    {"key": "small-strict", "file": "smollm2-135m-instruct", "max_context_length": 8192,
     "loadable_context_length": 2048},
    # declares 8192, loads 4096, loses its start past 2500
    {"key": "retriever", "file": "smollm2-135m-instruct", "max_context_length": 8192,
     "loadable_context_length": 4096, "working_context_length": 2500, "answers": "retriever"},
]


@pytest.fixture(scope="session")
def lmstudio(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The LM Studio-compatible test server, through the pytest plugin lmflow ships to users
    (`running_lmstudio_server`: `lmflow testing serve --config`, stopped by PID at the end). A test
    that needs one of its own asks the plugin's `lmstudio_server_factory` fixture for it."""
    from lmflow.testing.pytest_plugin import running_lmstudio_server

    with running_lmstudio_server(tmp_path_factory.mktemp("lmstudio"), models=MODELS) as server:
        yield server.url


#: fixtures that need a real Prefect server, or the managed engine (llama-server and the model)
_NEEDS = {"prefect_api": "prefect", "engine": "engine", "lmstudio": "engine", "forgetful": "engine",
          "lmstudio_server_factory": "engine"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real parts their fixtures start, so the contributors' fast lane,
    `pytest -m "not engine and not prefect"`, leaves them out without a marker on every test."""
    for item in items:
        for fixture, marker in _NEEDS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
