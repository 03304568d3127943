"""lmflow's overhead over plain HTTP calls, against the same llama-server and a running Prefect server.

For N in 1, 10, 100, 1000 prompt steps (max_tokens 4): (a) N chat completions
with httpx in a loop; (b) the same N calls, each in a Prefect task run of a
bare Prefect flow (one at a time, each waiting for the one before, as lmflow
submits them; a whole process like (c)): what Prefect alone costs; (c) `lmflow
run` of an N-step spec with max_parallel 1 (one step at a time; a whole
process: Python start, Prefect import, flow and task runs). Overhead = (b or c)
- a, fitted as fixed + per_step * N; lmflow's own share is (c) - (b). The
per-step cost between 10 and 100 and between 100 and 1000 steps shows whether
it grows with N. Targets: per step <= 10 ms, flat between 100 and 1000, fixed < 3 s.
Run: .venv/bin/python bench/overhead.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SIZES = (1, 10, 100, 1000)
REPEATS = 3


def spec_text(n: int, url: str, nonce: str) -> str:
    lines = ["version: 1", f"name: overhead-{n}", "server: {backend: openai, url: " + url + "}",
             "models: {smol: {key: smol}}", "defaults: {cache: false, max_parallel: 1}", "steps:"]
    for i in range(n):
        lines += [f"  - id: s{i}", "    prompt:", "      model: smol",
                  f"      user: \"{nonce} say hi number {i}\"", "      temperature: 0",
                  "      max_tokens: 4"]
    return "\n".join(lines) + "\n"


def ask(http: httpx.Client, nonce: str, i: int) -> str:
    r = http.post("/v1/chat/completions", json={
        "model": "smol", "temperature": 0, "max_tokens": 4,
        "messages": [{"role": "user", "content": f"{nonce} say hi number {i}"}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def plain(url: str, n: int, nonce: str) -> float:
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n):
            ask(http, nonce, i)
    return time.perf_counter() - started


def bare_prefect_flow(url: str, n: int, nonce: str) -> None:
    """(b): the calls of `plain`, one Prefect task run each, submitted as lmflow submits steps."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    http = httpx.Client(base_url=url, timeout=60)

    @task(cache_policy=NO_CACHE, persist_result=False)
    def call(i: int) -> str:
        return ask(http, nonce, i)

    @flow(name=f"bare-{n}", persist_result=False, task_runner=ThreadPoolTaskRunner(max_workers=4))
    def calls() -> None:
        upstream: list = []
        for i in range(n):
            future = call.with_options(name=f"s{i}").submit(i, wait_for=upstream)
            future.wait()
            upstream = [future]

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), http:
        calls()


def through(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{command[1]} failed:\n{out.stderr[-2000:]}")
    return elapsed


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def report(label: str, points: list[tuple[int, float]]) -> float:
    fixed, per_step = fit(points)
    over = dict(points)
    mid = (over[100] - over[10]) / 90
    high = (over[1000] - over[100]) / 900
    print(f"{label}: fixed {fixed:.2f}s, per step {per_step * 1000:.1f}ms; between 10 and 100 steps "
          f"{mid * 1000:.1f}ms, between 100 and 1000 {high * 1000:.1f}ms "
          f"(growth x{high / mid if mid > 0 else float('nan'):.2f})")
    return per_step


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LMFLOW_HOME"] = str(Path(tmp) / "home")
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        from lmflow.backends.catalog import llama_server_binary, locate
        from lmflow.backends.local import LlamaServer
        from lmflow.prefect import server as prefect_server

        engine = LlamaServer(llama_server_binary(), locate("smollm2-135m-instruct", Path(tmp)),
                             key="smollm2-135m-instruct", context_length=2048, alias="smol")
        engine.start()
        server = prefect_server.start()
        lmflow = [str(Path(sys.executable).parent / "lmflow"), "run"]
        bare_env = {**os.environ, **prefect_server.QUIET, "PREFECT_API_URL": server.url}

        def bare(n: int) -> list[str]:
            return [sys.executable, __file__, "--bare", engine.url, str(n)]

        try:
            plain(engine.url, 3, "warm")
            specs = {}
            for n in SIZES:
                specs[n] = Path(tmp) / f"overhead-{n}.yaml"
                specs[n].write_text(spec_text(n, engine.url, "B"))
            through(lmflow + [str(specs[1])])  # the first flow runs register their flows
            through(bare(1), bare_env)
            print(f"llama-server {engine.url}, Prefect server {server.url}, "
                  f"median of {REPEATS} runs each, interleaved")
            print(f"{'N':>4}  {'httpx (s)':>10}  {'bare Prefect (s)':>17}  {'lmflow run (s)':>15}  "
                  f"{'Prefect over (s)':>17}  {'lmflow over (s)':>16}")
            prefect_points, lmflow_points = [], []
            for n in SIZES:
                # interleaved, not three of each in a row: a Prefect server still busy with the
                # events of the runs before (and its growing database) weighs on (b) and (c) alike
                runs = [(plain(engine.url, n, "A"), through(bare(n), bare_env),
                         through(lmflow + [str(specs[n])])) for _ in range(REPEATS)]
                a, b, c = (statistics.median(column) for column in zip(*runs, strict=True))
                prefect_points.append((n, b - a))
                lmflow_points.append((n, c - a))
                print(f"{n:>4}  {a:>10.3f}  {b:>17.3f}  {c:>15.3f}  {b - a:>17.3f}  {c - a:>16.3f}")
            floor = report("bare Prefect over httpx", prefect_points)
            per_step = report("lmflow over httpx", lmflow_points)
            fixed = fit(lmflow_points)[0]
            print(f"lmflow: fixed overhead {fixed:.2f}s (target < 3s: {'met' if fixed < 3 else 'MISSED'}); "
                  f"per-step overhead {per_step * 1000:.1f}ms (target <= 10ms: "
                  f"{'met' if per_step <= 0.010 else 'MISSED'}), of which Prefect's task runs "
                  f"{floor * 1000:.1f}ms and lmflow's own {(per_step - floor) * 1000:.1f}ms")
        finally:
            prefect_server.stop()
            engine.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        bare_prefect_flow(sys.argv[2], int(sys.argv[3]), "C")
    else:
        main()
