"""The fixed cost of a run: `lmflow run` vs a served deployment vs a process worker.

A spec with one python step (no model), against a Prefect server this benchmark
starts in a temporary home. For each way of running it, REPEATS runs:
- `lmflow run`: wall time of the whole command (Python start, Prefect import,
  flow and task run), and from the command's start to the step's start;
- served (`lmflow serve`) and worker (`lmflow deploy` + `lmflow worker`): flow
  runs scheduled 20 s ahead (what a schedule does) and runs started "now" (as
  from the UI); latency = the step's task run start - the flow run's scheduled
  time (what the schedule promised).
Prints each figure's median and range, and ratios against `lmflow run`.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPEATS = 5
AHEAD = 20.0  # scheduled this far ahead: what a schedule does (the poll and the start happen before)
LMFLOW = str(Path(sys.executable).parent / "lmflow")
SPEC = """\
version: 1
name: fixed-cost
defaults: {cache: false}
steps:
  - id: step
    python: {function: "json:dumps", args: {obj: [1, 2, 3]}}
"""


def when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def task_start(api: str, flow_run_id: str, timeout: float = 120) -> tuple[float, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()
        if run["state_type"] in ("FAILED", "CRASHED"):
            raise RuntimeError(f"flow run {flow_run_id}: {run['state']}")
        if run["state_type"] == "COMPLETED":
            tasks = httpx.post(f"{api}/task_runs/filter", timeout=30, json={
                "flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
            if tasks and tasks[0].get("start_time"):  # task runs are recorded from events, a moment later
                return when(tasks[0]["start_time"]), run
        time.sleep(0.05)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout:g}s")


def deployed(api: str, name: str, repeats: int, ahead: float) -> list[float]:
    """Runs scheduled `ahead` seconds from now (0: "run now", as from the UI), 3 s apart."""
    deadline = time.monotonic() + 90
    while (found := httpx.get(f"{api}/deployments/name/{name}/{name}", timeout=30)).status_code == 404:
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment {name} was not registered within 90 s")
        time.sleep(0.5)
    deployment = found.json()
    runs = []
    for i in range(repeats):
        body: dict = {}
        if ahead:
            at = datetime.fromtimestamp(time.time() + ahead + 3 * i, tz=timezone.utc).isoformat()
            body = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": at}}}
        answer = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json=body, timeout=30)
        if answer.status_code >= 400:
            raise RuntimeError(f"create_flow_run: {answer.status_code} {answer.text[:300]}")
        runs.append(answer.json())
        if not ahead:  # one at a time: each waits for the next poll
            started, finished = task_start(api, runs[-1]["id"])
            runs[-1]["latency"] = started - when(finished["expected_start_time"])
    latencies = []
    for run in runs:
        if "latency" not in run:
            started, finished = task_start(api, run["id"], timeout=120 + ahead + 3 * repeats)
            run["latency"] = started - when(finished["expected_start_time"])
        latencies.append(run["latency"])
    return latencies


def lmflow_run(spec: Path, env: dict[str, str], repeats: int) -> tuple[list[float], list[float]]:
    walls, to_step = [], []
    for _ in range(repeats):
        started = time.time()
        out = subprocess.run([LMFLOW, "run", str(spec), "--json"], capture_output=True, text=True,
                             env=env, check=True)
        walls.append(time.time() - started)
        import json

        flow_run_id = json.loads(out.stdout)["flow_run_id"]
        step_started, _ = task_start(env["PREFECT_API_URL"], flow_run_id)
        to_step.append(step_started - started)
    return walls, to_step


def show(label: str, values: list[float], base: float | None = None) -> None:
    median = statistics.median(values)
    ratio = f"  ({median / base:.2f}x lmflow run)" if base else ""
    print(f"{label:<50} median {median:6.2f} s  range {min(values):.2f}-{max(values):.2f} s{ratio}")


def start(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "LMFLOW_HOME": str(root / "home"), "PREFECT_HOME": str(root / "prefect")}
        env.pop("PREFECT_API_URL", None)
        repo = root / "repo"
        repo.mkdir()
        spec = repo / "fixed-cost.yaml"
        spec.write_text(SPEC)
        for args in (["init", "-q"], ["add", "."], ["-c", "user.name=b", "-c", "user.email=b@b",
                                                     "commit", "-qm", "spec"]):
            subprocess.run(["git", *args], cwd=repo, check=True)
        from lmflow.backends.local import free_port

        port = free_port()
        subprocess.run([LMFLOW, "server", "start", "--port", str(port)], env=env, check=True,
                       capture_output=True)
        api = f"http://127.0.0.1:{port}/api"
        env["PREFECT_API_URL"] = api
        procs: list[subprocess.Popen] = []
        try:
            subprocess.run([LMFLOW, "run", str(spec)], env=env, check=True, capture_output=True)  # warm
            walls, to_step = lmflow_run(spec, env, REPEATS)
            procs.append(start([LMFLOW, "serve", str(spec)], env, repo))
            served = deployed(api, "fixed-cost", REPEATS, AHEAD)
            served_now = deployed(api, "fixed-cost", REPEATS, 0)
            stop(procs.pop())
            subprocess.run([LMFLOW, "deploy", str(spec), "--pool", "bench-pool"], env=env, check=True,
                           capture_output=True)
            procs.append(start([LMFLOW, "worker", "--pool", "bench-pool", "--repo", str(repo)], env, repo))
            worker = deployed(api, "fixed-cost", REPEATS, AHEAD)
            worker_now = deployed(api, "fixed-cost", REPEATS, 0)
        finally:
            for proc in procs:
                stop(proc)
            subprocess.run([LMFLOW, "server", "stop"], env=env, capture_output=True)
    print(f"one python step, {REPEATS} runs each, a running Prefect server, {os.cpu_count()} cores")
    base = statistics.median(to_step)
    show("lmflow run: whole command", walls)
    show("lmflow run: command start -> step start", to_step)
    show("served, scheduled: scheduled time -> step start", served, base)
    show("served, run now: created -> step start", served_now, base)
    show("worker, scheduled: scheduled time -> step start", worker, base)
    show("worker, run now: created -> step start", worker_now, base)


if __name__ == "__main__":
    main()
