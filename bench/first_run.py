"""The first command's cost: which Prefect server `lmflow run` should use when none runs.

Wall time of `lmflow run` of a one-step python spec (no model), as a user runs it:
(a) LMFLOW_PREFECT_SERVER=temporary: every run starts and stops a server of its own
    (`a, new home`: a new user's very first run, the server creates its database);
(b) the default, no server running: the run starts the lmflow server in the
    background (`b, new home`: a new user's first run; `b`: a first run after
    `lmflow server stop`, the database already there);
(c) the default with that server running: every later run.
Rounds are interleaved, each in its own LMFLOW_HOME/PREFECT_HOME under a temporary
directory; every server started is stopped (`lmflow server stop`, then SIGKILL by
PID to anything left). Prints each figure's median and range, and (b)/(a), (c)/(a).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

LMFLOW = str(Path(sys.executable).parent / "lmflow")
ANNOUNCED = "lmflow: starting a Prefect server in the background"
SPEC = """\
version: 1
name: first-run
defaults: {cache: false}
steps:
  - id: step
    python: {function: "json:dumps", args: {obj: [1, 2, 3]}}
"""


def timed_run(spec: Path, env: dict[str, str], starts_server: bool | None = None) -> float:
    started = time.perf_counter()
    out = subprocess.run([LMFLOW, "run", str(spec)], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"lmflow run failed:\n{out.stderr[-2000:]}")
    if starts_server is not None and (ANNOUNCED in out.stderr) != starts_server:
        raise SystemExit(f"expected the run {'to' if starts_server else 'not to'} start the server:\n"
                         f"{out.stderr[-2000:]}")
    return elapsed


def home_env(root: Path, **settings: str) -> dict[str, str]:
    from lmflow.backends.local import free_port

    env = {**os.environ, "LMFLOW_HOME": str(root / "lmflow"), "PREFECT_HOME": str(root / "prefect"),
           "LMFLOW_PREFECT_SERVER_PORT": str(free_port()), **settings}  # not 4200: a user's may be there
    env.pop("PREFECT_API_URL", None)
    return env


def stop_everything(root: Path) -> None:
    """Every process started for a home under `root`: `lmflow server stop`, then SIGKILL by PID."""
    for home in root.glob("*/lmflow"):
        subprocess.run([LMFLOW, "server", "stop"], env={**os.environ, "LMFLOW_HOME": str(home)},
                       capture_output=True, timeout=60)
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("LMFLOW_HOME", "").startswith(str(root)):
                proc.kill()
        except psutil.Error:
            continue


def show(label: str, values: list[float], base: list[float] | None = None) -> None:
    line = (f"{label:<34} median {statistics.median(values):6.2f}s  range {min(values):6.2f}-"
            f"{max(values):6.2f}s  (n={len(values)})")
    if base:
        line += f"  x{statistics.median(values) / statistics.median(base):.2f} of (a)"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    figures: dict[str, list[float]] = {k: [] for k in ("a_new", "a", "b_new", "b", "c")}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = root / "first-run.yaml"
        spec.write_text(SPEC)
        try:
            for i in range(rounds):
                temporary = home_env(root / f"temporary-{i}", LMFLOW_PREFECT_SERVER="temporary")
                figures["a_new"].append(timed_run(spec, temporary, starts_server=False))
                figures["a"].append(timed_run(spec, temporary, starts_server=False))
                background = home_env(root / f"background-{i}")
                figures["b_new"].append(timed_run(spec, background, starts_server=True))
                figures["c"].append(timed_run(spec, background, starts_server=False))
                subprocess.run([LMFLOW, "server", "stop"], env=background, check=True, capture_output=True)
                figures["b"].append(timed_run(spec, background, starts_server=True))
                figures["c"].append(timed_run(spec, background, starts_server=False))
                subprocess.run([LMFLOW, "server", "stop"], env=background, check=True, capture_output=True)
                last = ", ".join(f"{k} {v[-1]:.2f}s" for k, v in figures.items())
                print(f"round {i + 1}/{rounds}: {last}", flush=True)
        finally:
            stop_everything(root)
    print(f"\n`lmflow run` of one python step, {rounds} rounds, {os.cpu_count()} cores, load average "
          f"{load:.1f} before and {os.getloadavg()[0]:.1f} after")
    show("(a) temporary server, new home", figures["a_new"])
    show("(a) temporary server", figures["a"])
    show("(b) starts the server, new home", figures["b_new"], figures["a_new"])
    show("(b) starts the server", figures["b"], figures["a"])
    show("(c) server running (later runs)", figures["c"], figures["a"])
    a, b, c = (statistics.median(figures[k]) for k in ("a", "b", "c"))
    per_round = [x / y for x, y in zip(figures["b"], figures["a"], strict=True)]
    print(f"(b)/(a) = {b / a:.2f} (per round {min(per_round):.2f}-{max(per_round):.2f}), "
          f"(c)/(a) = {c / a:.2f}")


if __name__ == "__main__":
    main()
