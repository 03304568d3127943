"""Concurrent runs on one Prefect server: N `lmflow run`s of a small spec (a 40-item python map and
a step after it: about 40 task runs of events per run) started at once, in batches with no pause
between them, against lmflow's managed server on SQLite and on PostgreSQL.

Per batch: the wall time of the slowest run and of the median one, and how many runs took more
than 30 s (the stall: a run stuck in Prefect's flow-run creation). Each configuration gets a fresh
`lmflow server start [--database ...]` in its own LMFLOW_HOME (its own PostgreSQL database, dropped
at the end); everything started is stopped by its process group.

    python bench/concurrent_runs.py [--runs 8] [--batches 10] [--only sqlite|postgres]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

LMFLOW = Path(sys.executable).parent / "lmflow"
POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432"
SPEC = """\
version: 1
name: concurrent
defaults: {cache: false}
steps:
  - id: each
    foreach: ${{ params.xs }}
    python: {function: "concurrent_helpers:echo", args: {n: "${{ item }}"}}
  - id: after
    python: {function: "concurrent_helpers:echo", args: {n: "${{ steps.each.output }}"}}
params: {xs: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
              25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]}
"""
STALL = 30.0


def sh(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args[:3])}: {out.stderr.strip()[-500:]}")
    return out.stdout


def batch(spec: Path, runs: int, env: dict[str, str]) -> list[float]:
    started = time.perf_counter()
    procs = {subprocess.Popen([str(LMFLOW), "run", str(spec)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL): None for _ in range(runs)}
    seconds: dict[subprocess.Popen, float] = {}
    while len(seconds) < len(procs):  # each run's own end, whatever order they end in
        for proc in procs:
            if proc not in seconds and proc.poll() is not None:
                if proc.returncode:
                    raise RuntimeError(f"a run failed with exit code {proc.returncode}")
                seconds[proc] = time.perf_counter() - started
        if time.perf_counter() - started > 600:
            raise RuntimeError("a batch took more than 10 minutes")
        time.sleep(0.05)
    return list(seconds.values())


def configuration(name: str, database: str | None, runs: int, batches: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "concurrent_helpers.py").write_text("def echo(n):\n    return n\n")
        spec = folder / "concurrent.yaml"
        spec.write_text(SPEC)
        env = {**os.environ, "LMFLOW_HOME": str(folder / "home"), "PREFECT_HOME": str(folder / "prefect")}
        env.pop("PREFECT_API_URL", None)
        db_name = None
        if database:
            db_name = f"lmflow_bench_{uuid.uuid4().hex[:8]}"
            sh("psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"CREATE DATABASE {db_name}", env=env)
        try:
            start = [str(LMFLOW), "server", "start", "--port", str(_free_port())]
            if database:
                start += ["--database", f"{database}/{db_name}"]
            sh(*start, env=env)
            try:
                batch(spec, 1, env)  # warm: the first run registers the flow
                slowest, medians, stalled = [], [], 0
                for b in range(batches):
                    seconds = batch(spec, runs, env)
                    slowest.append(max(seconds))
                    medians.append(statistics.median(seconds))
                    stalled += sum(s > STALL for s in seconds)
                    print(f"  {name} batch {b + 1}: slowest {max(seconds):.1f}s, median "
                          f"{statistics.median(seconds):.1f}s", flush=True)
            finally:
                sh(str(LMFLOW), "server", "stop", env=env)
        finally:
            if db_name:
                sh("psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"DROP DATABASE IF EXISTS {db_name}",
                   env=env)
    return {"slowest_median": statistics.median(slowest), "slowest_max": max(slowest),
            "median_median": statistics.median(medians), "stalled_runs": stalled,
            "runs": runs * batches}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    args = parser.parse_args()
    results = {}
    for name, database in (("sqlite", None), ("postgres", POSTGRES)):
        if args.only in (None, name):
            results[name] = configuration(name, database, args.runs, args.batches)
    print(f"\n{args.runs} runs at once, {args.batches} batches (seconds from the batch's start):")
    for name, r in results.items():
        print(f"  {name:8}  slowest run per batch: median {r['slowest_median']:.1f}, max "
              f"{r['slowest_max']:.1f}; median run {r['median_median']:.1f}; runs over {STALL:g}s: "
              f"{r['stalled_runs']} of {r['runs']}")


if __name__ == "__main__":
    main()
