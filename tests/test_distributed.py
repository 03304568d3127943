"""One map across machines: `distribute: true` chunks taken by `lmflow worker --tasks` processes.

Each worker is a real process in a folder and an lmflow home of its own, with its own checkout of
the spec's repository, as if on another machine; they share only the Prefect server and the
folder named by LMFLOW_SHARED. Workers are stopped by their process group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import BIN, MODELS, lmflow_cmd, wait_for
from test_deploy import commit_all, stop

from lmflow.testing.pytest_plugin import RunningServer

pytestmark = [pytest.mark.prefect]

SQUARES = """\
version: 1
name: {name}
params: {{n: 2000, nap: 0.0}}
steps:
  - id: numbers
    python: {{function: "dist_helpers:numbers", args: {{n: "${{{{ params.n }}}}"}}}}
  - id: squares
    foreach: ${{{{ steps.numbers.output }}}}
    distribute: true
    parallel: 8
    python: {{function: "dist_helpers:square", args: {{x: "${{{{ item }}}}", nap: "${{{{ params.nap }}}}"}}}}
"""

HELPERS = """\
import os
import time


def numbers(n):
    return list(range(n))


def square(x, nap):
    time.sleep(nap)
    with open(os.path.join(os.environ["DIST_TRACE"], str(os.getpid())), "a") as out:
        out.write(f"{x}\\n")  # which worker computed what, and how often
    return {"x": x, "square": x * x, "pid": os.getpid()}
"""


def make_repo(folder: Path, name: str = "squares") -> Path:
    """A repository with the spec and its helpers, committed; the spec's path."""
    folder.mkdir(parents=True)
    (folder / "dist_helpers.py").write_text(HELPERS)
    (folder / f"{name}.yaml").write_text(SQUARES.format(name=name))
    commit_all(folder)
    return folder / f"{name}.yaml"


def shared_env(prefect_api: str, shared: Path, home: Path, trace: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "LMFLOW_SHARED": str(shared),
           "LMFLOW_HOME": str(home), "DIST_TRACE": str(trace)}
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)  # (the session's: LMFLOW_SHARED decides)
    return env


@pytest.fixture
def cluster(prefect_api: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """`cluster(name, *options)` starts a task worker "on another machine": its own clone of the
    repository, home and working folder; every worker is stopped at the end."""
    started: list[subprocess.Popen] = []

    def start(name: str, *options: str) -> subprocess.Popen:
        machine = tmp_path / name
        shutil.copytree(tmp_path / "repo", machine / "checkout", symlinks=True)
        env = shared_env(prefect_api, tmp_path / "shared", machine / "home", tmp_path / "trace")
        with open(machine / "stderr.txt", "w") as err:
            proc = subprocess.Popen([str(BIN / "lmflow"), "worker", "--tasks", *options],
                                    cwd=machine / "checkout", stdout=subprocess.DEVNULL, stderr=err, env=env,
                                    start_new_session=True)
        started.append(proc)
        # connected once Prefect lists it (a run checks that a worker is there before it sends)
        assert wait_for(lambda: proc.pid in connected(prefect_api), timeout=60), \
            (machine / "stderr.txt").read_text()
        return proc

    (tmp_path / "trace").mkdir()
    try:
        yield start
    finally:
        for proc in started:
            stop(proc)


def connected(prefect_api: str) -> set[int]:
    """The PIDs of the task workers of lmflow's chunks that Prefect lists as connected (a worker's
    identifier is HOST-PID)."""
    answer = httpx.post(f"{prefect_api}/task_workers/filter", json={}, timeout=30).json()
    return {int(w["identifier"].rsplit("-", 1)[1]) for w in answer
            if any(k.startswith("remote_chunk") for k in w["task_keys"])}


def run(spec: Path, prefect_api: str, tmp_path: Path, *params: str) -> subprocess.CompletedProcess[str]:
    env = shared_env(prefect_api, tmp_path / "shared", tmp_path / "home", tmp_path / "trace")
    args = [a for p in params for a in ("-p", p)]
    return subprocess.run([str(BIN / "lmflow"), "run", str(spec), "--json", *args], capture_output=True,
                          text=True, env=env, cwd=spec.parent, timeout=600)


def step(out: str, step_id: str) -> dict:
    """A step's record from `lmflow run --json`."""
    return next(s for s in json.loads(out)["steps"] if s["id"] == step_id)


def computed(tmp_path: Path) -> dict[int, list[int]]:
    """pid -> the items it computed, as the helpers traced them."""
    return {int(f.name): [int(x) for x in f.read_text().split()] for f in (tmp_path / "trace").iterdir()}


def test_a_map_over_two_workers_has_every_item_once_in_order(
        prefect_api: str, tmp_path: Path, cluster: Callable[..., subprocess.Popen]) -> None:
    spec = make_repo(tmp_path / "repo")
    one, two = cluster("one"), cluster("two")
    out = run(spec, prefect_api, tmp_path)
    assert out.returncode == 0, out.stderr
    output = step(out.stdout, "squares")["output"]
    assert [row["x"] for row in output] == list(range(2000))
    assert all(row["square"] == row["x"] ** 2 for row in output)
    assert {row["pid"] for row in output} == {one.pid, two.pid}  # both machines took chunks
    traced = computed(tmp_path)
    assert sorted(x for xs in traced.values() for x in xs) == list(range(2000))  # each computed once
    assert (tmp_path / "one" / "stderr.txt").read_text().count("took squares[") >= 1

    # which worker took each chunk: the run's view, and one item's
    env = shared_env(prefect_api, tmp_path / "shared", tmp_path / "home", tmp_path / "trace")
    run_id = json.loads(out.stdout)["run_id"]
    shown = subprocess.run([str(BIN / "lmflow"), "runs", "show", run_id], capture_output=True, text=True,
                           env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    taken = next(line for line in shown.stdout.splitlines() if line.startswith("squares: chunks taken by"))
    assert f":{one.pid} (" in taken and f":{two.pid} (" in taken, taken
    item = subprocess.run([str(BIN / "lmflow"), "runs", "show", run_id, "--item", "squares[1500]"],
                          capture_output=True, text=True, env=env, timeout=120)
    worker = next(row["pid"] for row in output if row["x"] == 1500)
    assert re.search(rf"ran in   squares\[\d+:\d+\] on \S+:{worker}\n", item.stdout), item.stdout

    # a re-run reuses every item, whichever machine answered it (the step cache is in LMFLOW_SHARED)
    again = run(spec, prefect_api, tmp_path)
    assert again.returncode == 0, again.stderr
    assert step(again.stdout, "squares")["items"]["cached"] == 2000
    assert sorted(x for xs in computed(tmp_path).values() for x in xs) == list(range(2000))


def test_a_worker_killed_in_a_chunk_loses_and_doubles_nothing(
        prefect_api: str, tmp_path: Path, cluster: Callable[..., subprocess.Popen]) -> None:
    spec = make_repo(tmp_path / "repo")
    victim = cluster("victim", "--limit", "1")
    out_file = tmp_path / "run.json"
    env = shared_env(prefect_api, tmp_path / "shared", tmp_path / "home", tmp_path / "trace")
    with open(out_file, "w") as out:
        running = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec), "--json", "-p", "n=400",
                                    "-p", "nap=0.2"], stdout=out, stderr=subprocess.PIPE, text=True,
                                   env=env, cwd=spec.parent, start_new_session=True)
    try:
        # the victim has answered some items of its first chunk: SIGKILL, mid-chunk
        assert wait_for(lambda: len(computed(tmp_path).get(victim.pid, [])) >= 20
                        or running.poll() is not None, timeout=120)
        assert running.poll() is None, running.communicate()
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        done_by_victim = set(computed(tmp_path)[victim.pid])
        cluster("rescuer")
        _, stderr = running.communicate(timeout=300)
    finally:
        stop(running)
    assert running.returncode == 0, stderr
    output = step(out_file.read_text(), "squares")["output"]
    assert [row["x"] for row in output] == list(range(400))  # none lost, none doubled, in order
    traced = computed(tmp_path)
    rescued = [x for pid, xs in traced.items() if pid != victim.pid for x in xs]
    # what the victim reported before it died is kept: at most its items in flight are asked again
    assert len(set(rescued) & done_by_victim) <= 8
    assert sorted(set(rescued) | done_by_victim) == list(range(400))
    assert "stopped answering" in stderr and "go to another worker" in stderr, stderr


def test_a_run_with_no_worker_says_so_instead_of_waiting(prefect_api: str, tmp_path: Path) -> None:
    spec = make_repo(tmp_path / "repo")
    (tmp_path / "trace").mkdir()
    out = run(spec, prefect_api, tmp_path, "n=10")
    assert out.returncode == 1
    assert "no lmflow task worker is connected to the Prefect server" in out.stderr, out.stderr
    assert "lmflow worker --tasks" in out.stderr
    assert "Traceback" not in out.stderr


def test_without_a_shared_folder_both_sides_say_how_to_set_it(prefect_api: str, tmp_path: Path) -> None:
    spec = make_repo(tmp_path / "repo")
    env = {"PREFECT_API_URL": prefect_api, "LMFLOW_SHARED": ""}
    out = lmflow_cmd("run", str(spec), "-p", "n=10", env=env, cwd=spec.parent)
    assert out.returncode == 1
    assert "set LMFLOW_SHARED" in out.stderr and "Traceback" not in out.stderr, out.stderr
    worker = lmflow_cmd("worker", "--tasks", env=env, cwd=spec.parent, timeout=60)
    assert worker.returncode == 1
    assert "set LMFLOW_SHARED" in worker.stderr and "Traceback" not in worker.stderr, worker.stderr


def test_worker_options_are_checked() -> None:
    neither = lmflow_cmd("worker")
    assert neither.returncode == 2 and "give --pool NAME" in neither.stderr
    bad = lmflow_cmd("worker", "--tasks", "--server", "gpu", env={"LMFLOW_SHARED": "/tmp"}, timeout=60)
    assert bad.returncode == 1 and "expected NAME=URL" in bad.stderr, bad.stderr
    misplaced = lmflow_cmd("worker", "--pool", "p", "--server", "gpu=http://127.0.0.1:1")
    assert misplaced.returncode == 2 and "use it with --tasks" in misplaced.stderr


@pytest.mark.engine
def test_each_worker_asks_its_own_model_server(
        prefect_api: str, tmp_path: Path, cluster: Callable[..., subprocess.Popen],
        lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "asks.yaml").write_text(textwrap.dedent("""\
        version: 1
        name: asks
        servers:
          studio: {backend: lmstudio, url: "http://127.0.0.1:9"}  # nothing there: workers map it
        models:
          smol: {key: smollm2-135m-instruct, server: studio}
        defaults: {cache: false}
        steps:
          - id: ask
            foreach: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
            distribute: true
            grain: 3
            parallel: 2
            prompt: {model: smol, user: "Say ${{ item }}.", max_tokens: 2, temperature: 0}
        """))
    commit_all(repo)
    servers = [lmstudio_server_factory(models=MODELS) for _ in range(2)]
    for i, server in enumerate(servers):
        cluster(f"gpu{i}", "--server", f"studio={server.url}")
    out = run(repo / "asks.yaml", prefect_api, tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(step(out.stdout, "ask")["output"]) == 12
    for i, server in enumerate(servers):
        took = (tmp_path / f"gpu{i}" / "stderr.txt").read_text()
        items = sum(int(line.split(": ")[1].split()[0])
                    for line in took.splitlines() if line.startswith("took "))
        assert httpx.get(f"{server.url}/lmflow/stats").json()["chat_requests"] == items, took
