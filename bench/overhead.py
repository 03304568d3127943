"""lmflow's overhead over plain HTTP calls, against the same llama-server and a running Prefect server.

For N in 1, 10, 100, 1000 prompt steps (max_tokens 4): (a) N chat completions
with httpx in a loop, (b) `lmflow run` of an N-step spec with max_parallel 1 (one
step at a time, like the loop; a whole process: Python start, Prefect import,
flow and task runs). Overhead = b - a, fitted as fixed + per_step * N; the
per-step cost between 10 and 100 and between 100 and 1000 steps shows whether
it grows with N. Targets: per step <= 10 ms, flat between 100 and 1000, fixed < 3 s.
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


def plain(url: str, n: int, nonce: str) -> float:
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n):
            r = http.post("/v1/chat/completions", json={
                "model": "smol", "temperature": 0, "max_tokens": 4,
                "messages": [{"role": "user", "content": f"{nonce} say hi number {i}"}]})
            r.raise_for_status()
            r.json()["choices"][0]["message"]["content"]
    return time.perf_counter() - started


def through_lmflow(spec: Path) -> float:
    lmflow = Path(sys.executable).parent / "lmflow"
    started = time.perf_counter()
    out = subprocess.run([str(lmflow), "run", str(spec)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"lmflow run failed:\n{out.stderr[-2000:]}")
    return elapsed


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LMFLOW_HOME"] = str(Path(tmp) / "home")
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        from lmflow import prefect_server
        from lmflow.backends.catalog import llama_server_binary, locate
        from lmflow.backends.local import LlamaServer

        engine = LlamaServer(llama_server_binary(), locate("smollm2-135m-instruct", Path(tmp)),
                             key="smollm2-135m-instruct", context_length=2048, alias="smol")
        engine.start()
        server = prefect_server.start()
        try:
            plain(engine.url, 3, "warm")
            specs = {}
            for n in SIZES:
                specs[n] = Path(tmp) / f"overhead-{n}.yaml"
                specs[n].write_text(spec_text(n, engine.url, "B"))
            through_lmflow(specs[1])  # first flow run registers the flow
            print(f"llama-server {engine.url}, Prefect server {server.url}, "
                  f"median of {REPEATS} runs each")
            print(f"{'N':>3}  {'httpx (s)':>10}  {'lmflow run (s)':>15}  {'overhead (s)':>13}")
            points = []
            for n in SIZES:
                a = statistics.median(plain(engine.url, n, "A") for _ in range(REPEATS))
                b = statistics.median(through_lmflow(specs[n]) for _ in range(REPEATS))
                points.append((n, b - a))
                print(f"{n:>3}  {a:>10.3f}  {b:>15.3f}  {b - a:>13.3f}")
            fixed, per_step = fit(points)
            over = dict(points)
            mid = (over[100] - over[10]) / 90
            high = (over[1000] - over[100]) / 900
            print(f"fixed overhead {fixed:.2f}s (target < 3s: {'met' if fixed < 3 else 'MISSED'}); "
                  f"per-step overhead {per_step * 1000:.1f}ms "
                  f"(target <= 10ms: {'met' if per_step <= 0.010 else 'MISSED'})")
            print(f"per-step overhead between 10 and 100 steps {mid * 1000:.1f}ms, between 100 and 1000 "
                  f"{high * 1000:.1f}ms (growth x{high / mid if mid > 0 else float('nan'):.2f})")
        finally:
            prefect_server.stop()
            engine.stop()


if __name__ == "__main__":
    main()
