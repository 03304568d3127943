"""Scale-out against a PostgreSQL-backed Prefect server: two workers on one pool, and the limit
each shared model server gets so that concurrent runs never overload it.

The Prefect server is started the way users start it (`lmflow server start --database ...`,
with its own LMFLOW_HOME), in a database of its own that is dropped at the end; workers, runs
and servers are real processes, each stopped by its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import BIN, MODELS, lmflow_cmd, wait_for
from test_deploy import api, git, stop

from lmflow.prefect.limits import limit_name
from lmflow.testing.pytest_plugin import RunningServer

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432"


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    name = f"lmflow_test_{uuid.uuid4().hex[:12]}"
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", name], check=True, timeout=60)
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--force", "--if-exists", name],
                       check=True, timeout=60)


@pytest.fixture(scope="module")
def pg_api(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prefect server on PostgreSQL, as `lmflow server start --database` starts it."""
    from lmflow.backends.local import free_port

    home = tmp_path_factory.mktemp("pg-server")
    env = {"LMFLOW_HOME": str(home)}
    out = lmflow_cmd("server", "start", "--port", str(free_port()), "--database", database, env=env)
    state_file = home / "prefect-server" / "server.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    try:
        assert out.returncode == 0, out.stderr
        assert f"database {database}" in out.stdout
        yield state["url"]
    finally:
        lmflow_cmd("server", "stop", env=env)
        if state and psutil.pid_exists(state["pid"]):
            os.killpg(state["pid"], signal.SIGKILL)


def flow_runs(prefect_api: str, deployment_id: str) -> list[dict]:
    return api(prefect_api, "/flow_runs/filter", {  # type: ignore[return-value]
        "flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200})


# ---------------------------------------------------------------- two workers, one pool

DRAIN = """\
version: 1
name: drain
params: {n: 0}
defaults: {cache: false}
steps:
  - id: record
    python: {function: "scale_helpers:record", args: {n: "${{ params.n }}"}}
"""

HELPERS = """\
import os

def record(n):
    with open("drained.txt", "a") as out:  # one short line per write: appends do not interleave
        out.write(f"{n} {os.environ['SCALE_WORKER']}\\n")
    return n
"""

RUNS = 40


def test_two_workers_drain_a_batch_with_none_lost_and_none_run_twice(pg_api: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "specs").mkdir(parents=True)
    (repo / "specs" / "drain.yaml").write_text(DRAIN)
    (repo / "specs" / "scale_helpers.py").write_text(HELPERS)
    for args in (("init", "-q"), ("config", "user.email", "t@example.com"), ("config", "user.name", "t"),
                 ("add", "."), ("commit", "-qm", "spec")):
        git(repo, *args)
    env = {**os.environ, "PREFECT_API_URL": pg_api, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    out = lmflow_cmd("deploy", str(repo / "specs" / "drain.yaml"), "--pool", "scale-pool", env=env)
    assert out.returncode == 0, out.stderr
    deployment = httpx.get(f"{pg_api}/deployments/name/drain/drain", timeout=30).json()

    workers = [subprocess.Popen([str(BIN / "lmflow"), "worker", "--pool", "scale-pool", "--repo", str(repo),
                                 "--limit", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=tmp_path, env={**env, "SCALE_WORKER": name}, start_new_session=True)
               for name in ("a", "b")]
    started = time.monotonic()
    try:
        for n in range(RUNS):
            api(pg_api, f"/deployments/{deployment['id']}/create_flow_run",
                {"parameters": {"spec_path": "specs/drain.yaml", "params": {"n": n}}})

        def all_final() -> list[dict] | None:
            runs = flow_runs(pg_api, deployment["id"])
            final = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
            return runs if len(final) == RUNS else None

        runs = wait_for(all_final, timeout=900, interval=2)
    finally:
        for worker in workers:
            stop(worker)
    seconds = time.monotonic() - started
    assert runs, f"not all {RUNS} runs finished within 900 s"
    assert [r["state_type"] for r in runs] == ["COMPLETED"] * RUNS
    lines = [line.split() for line in (repo / "specs" / "drained.txt").read_text().splitlines()]
    assert sorted(int(n) for n, _ in lines) == list(range(RUNS))  # none lost, none run twice
    by_worker = {w: sum(1 for _, name in lines if name == w) for w in ("a", "b")}
    assert all(by_worker.values()), by_worker  # both workers took runs
    print(f"\n{RUNS} runs drained by two workers in {seconds:.0f} s ({by_worker})")


# ---------------------------------------------------------------- the limit per model server

def spec_against(folder: Path, url: str, tag: str) -> Path:
    """Three prompt steps that may run at once; the server allows one request at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shared-{tag}.yaml"
    steps = "".join(f'  - id: ask{i}\n    prompt: {{model: smol, user: "Say {tag} {i}.", max_tokens: 2, '
                    'temperature: 0}\n' for i in range(3))
    path.write_text(textwrap.dedent(f"""\
        version: 1
        name: shared-{tag}
        servers:
          studio: {{backend: lmstudio, url: "{url}", parallel: 1, shared_limit: true}}
        models:
          smol: {{key: smollm2-135m-instruct, server: studio}}
        defaults: {{cache: false}}
        steps:
        """) + steps)
    return path


def run_at_once(specs: list[Path], env: dict[str, str]) -> list[subprocess.CompletedProcess | int]:
    procs = [subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
                              start_new_session=True) for spec in specs]
    try:
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            results.append((proc.returncode, out + err))
        return results
    finally:
        for proc in procs:
            stop(proc)


@pytest.mark.engine
def test_the_limit_of_a_shared_server_holds_across_runs(
        pg_api: str, tmp_path: Path, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    url = lmstudio_server_factory(models=MODELS, delay_seconds=1.5).url
    name = limit_name(url)
    env = {"PREFECT_API_URL": pg_api}
    # enforced: lmflow creates the limit (size: the server's parallel) and every call holds it
    httpx.delete(f"{pg_api}/v2/concurrency_limits/{name}", timeout=30)
    httpx.post(f"{url}/lmflow/stats/reset")
    results = run_at_once([spec_against(tmp_path / f"on{i}", url, f"on{i}") for i in range(3)], env)
    assert [code for code, _ in results] == [0, 0, 0], results
    limit = httpx.get(f"{pg_api}/v2/concurrency_limits/{name}", timeout=30).json()
    assert (limit["limit"], limit["active"], limit["active_slots"]) == (1, True, 0)
    enforced = httpx.get(f"{url}/lmflow/stats").json()
    assert enforced["chat_requests"] == 9
    assert enforced["max_in_flight"] == 1

    # set inactive in Prefect (as from its UI): lmflow leaves it so, and runs then overlap
    answer = httpx.patch(f"{pg_api}/v2/concurrency_limits/{name}", json={"active": False}, timeout=30)
    assert answer.status_code == 204, answer.text
    httpx.post(f"{url}/lmflow/stats/reset")
    results = run_at_once([spec_against(tmp_path / f"off{i}", url, f"off{i}") for i in range(3)], env)
    assert [code for code, _ in results] == [0, 0, 0], results
    assert httpx.get(f"{pg_api}/v2/concurrency_limits/{name}", timeout=30).json()["active"] is False
    free = httpx.get(f"{url}/lmflow/stats").json()
    assert free["chat_requests"] == 9
    assert free["max_in_flight"] >= 2  # each run alone sends one at a time: the overlap is across runs
