"""Scale-out: runs per minute of a short spec (one python step) drained from a work pool by one and
by two `lmflow worker`s, against a Prefect server on SQLite and on PostgreSQL; and what holding the
shared limit of a model server costs per model call on each.

Each configuration: a fresh `lmflow server start [--database ...]` with its own LMFLOW_HOME (and
its own PostgreSQL database, dropped at the end), the spec deployed to a pool, N flow runs created
through the API at once, timed from the first creation to the last completion. Every worker may run
`--limit` runs at once, so a second worker is a second machine's worth of capacity (here both share
2 cores with the server). Everything started is stopped by its process group.

    python bench/scale_out.py [N] [--limit K]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil

LMFLOW = Path(sys.executable).parent / "lmflow"
POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432"
SPEC = """\
version: 1
name: short
params: {n: 0}
defaults: {cache: false}
steps:
  - id: echo
    python: {function: "short_helpers:echo", args: {n: "${{ params.n }}"}}
"""
HELPERS = "def echo(n):\n    return n\n"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
#: 503 answers to our own API calls, by server kind (SQLite: "database is locked")
retries: dict[str, int] = {}


def sh(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(list(args), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                         text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args[:3])}: {out.stderr.strip()[-500:]}")
    return out.stdout


def stop_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
        psutil.Process(pid).wait(20)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass
    except psutil.TimeoutExpired:
        os.killpg(pid, signal.SIGKILL)


def make_repo(root: Path) -> Path:
    (root / "specs").mkdir(parents=True)
    (root / "specs" / "short.yaml").write_text(SPEC)
    (root / "specs" / "short_helpers.py").write_text(HELPERS)
    for args in (("init", "-q"), ("config", "user.email", "b@example.com"), ("config", "user.name", "b"),
                 ("add", "."), ("commit", "-qm", "spec")):
        sh("git", *args, cwd=root)
    return root


def gate_ms(api: str, holds: int = 30) -> float:
    """Milliseconds one model call spends holding the shared limit (acquire + release), in-process."""
    code = f"""
import os, time
os.environ["PREFECT_API_URL"] = {api!r}
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
from lmflow.prefect import limits
limits.ensure("lmflow-bench-gate", 4)
hold = limits.gate("lmflow-bench-gate")
with hold():
    pass
t = time.perf_counter()
for _ in range({holds}):
    with hold():
        pass
print((time.perf_counter() - t) / {holds} * 1000)
"""
    return float(sh(sys.executable, "-c", code).strip().splitlines()[-1])


def drain(api: str, repo: Path, pool: str, workers: int, runs: int, limit: int, env: dict[str, str]) -> float:
    """Runs per minute: N runs created at once, drained by `workers` workers."""
    answer = httpx.get(f"{api}/deployments/name/short/short", timeout=30)
    answer.raise_for_status()
    deployment = answer.json()
    procs = [subprocess.Popen([str(LMFLOW), "worker", "--pool", pool, "--repo", str(repo), "--limit",
                               str(limit)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, **env}, start_new_session=True) for _ in range(workers)]
    try:
        time.sleep(8)  # the workers are up and polling: their start is not the runs' cost
        started = time.perf_counter()
        ids = []
        for n in range(runs):
            for _ in range(20):  # SQLite answers 503 (database is locked) while workers write: retry
                made = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", timeout=30,
                                  json={"parameters": {"spec_path": "specs/short.yaml", "params": {"n": n}}})
                if made.status_code != 503:
                    break
                retries["503"] = retries.get("503", 0) + 1
                time.sleep(0.5)
            made.raise_for_status()
            ids.append(made.json()["id"])
        while True:
            answer = httpx.post(f"{api}/flow_runs/filter", timeout=30, json={
                "flow_runs": {"id": {"any_": ids}}, "limit": runs})
            states = answer.json() if answer.status_code == 200 else []
            retries["503"] = retries.get("503", 0) + (answer.status_code == 503)
            if sum(s["state_type"] in FINAL for s in states) == runs:
                break
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        bad = [s["state_type"] for s in states if s["state_type"] != "COMPLETED"]
        if bad:
            raise RuntimeError(f"{len(bad)} runs did not complete: {bad[:5]}")
        return runs / seconds * 60
    finally:
        for proc in procs:
            stop_group(proc.pid)


def measure(kind: str, runs: int, limit: int, tmp: Path) -> dict[str, float]:
    from lmflow.backends.local import free_port

    home = tmp / f"home-{kind}"
    env = {"LMFLOW_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results")}
    database = None
    if kind == "postgres":
        database = f"lmflow_bench_{uuid.uuid4().hex[:12]}"
        sh("createdb", "-h", "127.0.0.1", "-U", "postgres", database)
    state_file = home / "prefect-server" / "server.json"
    try:
        args = ["server", "start", "--port", str(free_port())]
        if database:
            args += ["--database", f"{POSTGRES}/{database}"]
        sh(str(LMFLOW), *args, env=env)
        api = json.loads(state_file.read_text())["url"]
        env["PREFECT_API_URL"] = api
        repo = make_repo(tmp / f"repo-{kind}")
        sh(str(LMFLOW), "deploy", str(repo / "specs" / "short.yaml"), "--pool", "bench", env=env)
        figures = {"gate_ms": gate_ms(api)}
        retries.clear()
        for workers in (1, 2):
            figures[f"{workers}w"] = drain(api, repo, "bench", workers, runs, limit, env)
            print(f"  {kind}, {workers} worker(s): {figures[f'{workers}w']:.1f} runs/min "
                  f"({retries.get('503', 0)} answers 503 to this script so far)", flush=True)
        return figures
    finally:
        state = json.loads(state_file.read_text()) if state_file.exists() else None
        subprocess.run([str(LMFLOW), "server", "stop"], env={**os.environ, **env}, capture_output=True)
        if state and psutil.pid_exists(state["pid"]):
            os.killpg(state["pid"], signal.SIGKILL)
        if database:
            sh("dropdb", "-h", "127.0.0.1", "-U", "postgres", "--force", "--if-exists", database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, nargs="?", default=20)
    parser.add_argument("--limit", type=int, default=2, help="runs at once per worker")
    options = parser.parse_args()
    print(f"{options.runs} runs of a one-step python spec, at most {options.limit} at once per worker "
          f"({os.cpu_count()} cores shared with the server)")
    with tempfile.TemporaryDirectory() as tmp:
        results = {kind: measure(kind, options.runs, options.limit, Path(tmp))
                   for kind in ("sqlite", "postgres")}
    print(f"\n{'server':<10} {'1 worker':>10} {'2 workers':>10} {'2w/1w':>7} {'gate ms/call':>13}")
    for kind, r in results.items():
        print(f"{kind:<10} {r['1w']:>10.1f} {r['2w']:>10.1f} {r['2w'] / r['1w']:>7.2f} {r['gate_ms']:>13.0f}")
    s, p = results["sqlite"], results["postgres"]
    print(f"postgres/sqlite: 1 worker {p['1w'] / s['1w']:.2f}, 2 workers {p['2w'] / s['2w']:.2f} "
          "(runs/min; higher is better)")


if __name__ == "__main__":
    main()
