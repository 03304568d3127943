"""Scale: a 100- and a 1,000-item map, a 100- and a 1,000-step spec; time per item/step and peak memory.

Each run is a whole `lmflow run` process against a running Prefect server, with
a trivial python step (no model: what is measured is lmflow + Prefect). For each
shape it prints the step's (or the run's) wall time per item/step, the peak RSS
of the lmflow process (sampled every 20 ms), and how both change from 100 to
1,000: flat per-item time and memory growing far less than 10x mean the cost
does not grow with N. Steps and items run 4 at once (max_parallel 4).
Run: .venv/bin/python bench/scale.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SIZES = (100, 1000)
HELPER = "def f(x):\n    return {'x': x, 'twice': x * 2}\n"


def map_spec(n: int) -> str:
    return f"""version: 1
name: scale-map-{n}
params: {{n: {n}}}
defaults: {{cache: false, max_parallel: 4}}
steps:
  - id: each
    foreach: {{file: items{n}.jsonl}}
    python: {{function: "scalehelp:f", args: {{x: "${{{{ item.i }}}}"}}}}
"""


def steps_spec(n: int) -> str:
    lines = ["version: 1", f"name: scale-steps-{n}", "defaults: {cache: false, max_parallel: 4}", "steps:"]
    for i in range(n):
        lines += [f"  - id: s{i}", f"    python: {{function: 'scalehelp:f', args: {{x: {i}}}}}"]
    return "\n".join(lines) + "\n"


def run(spec: Path) -> tuple[dict, float, int]:
    """The run's JSON result, wall seconds and peak RSS in bytes."""
    lmflow = Path(sys.executable).parent / "lmflow"
    out, err = spec.with_suffix(".out"), spec.with_suffix(".err")
    started = time.perf_counter()
    with out.open("w") as stdout, err.open("w") as stderr:  # files: a pipe would fill up and block
        proc = subprocess.Popen([str(lmflow), "run", str(spec), "--json"], stdout=stdout, stderr=stderr)
        peak = 0
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.02)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"lmflow run failed:\n{err.read_text()[-3000:]}")
    return json.loads(out.read_text()), wall, peak


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["LMFLOW_HOME"] = str(folder / "home")
        os.environ["PREFECT_HOME"] = str(folder / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        from lmflow.prefect import server as prefect_server

        (folder / "scalehelp.py").write_text(HELPER)
        server = prefect_server.start()
        try:
            results: dict[str, dict[int, tuple[float, int]]] = {"map": {}, "steps": {}}
            for n in SIZES:
                rows = "".join(json.dumps({"i": i}) + "\n" for i in range(n))
                (folder / f"items{n}.jsonl").write_text(rows)
                (folder / f"map{n}.yaml").write_text(map_spec(n))
                (folder / f"steps{n}.yaml").write_text(steps_spec(n))
            run(folder / f"map{SIZES[0]}.yaml")  # registers the flow, warms the server
            print(f"Prefect server {server.url}; python steps, max_parallel 4")
            print(f"{'shape':<16} {'wall (s)':>9} {'per unit (ms)':>14} {'peak RSS (MB)':>14}")
            for n in SIZES:
                result, wall, peak = run(folder / f"map{n}.yaml")
                seconds = result["steps"][0]["seconds"]
                assert result["steps"][0]["items"]["completed"] == n
                results["map"][n] = (seconds / n, peak)
                print(f"{f'map of {n}':<16} {seconds:>9.2f} {1000 * seconds / n:>14.2f} {peak / 1e6:>14.0f}"
                      f"   (whole process {wall:.1f}s)")
            for n in SIZES:
                result, wall, peak = run(folder / f"steps{n}.yaml")
                seconds = result["seconds"]
                assert sum(s["status"] == "completed" for s in result["steps"]) == n
                results["steps"][n] = (seconds / n, peak)
                print(f"{f'{n} steps':<16} {seconds:>9.2f} {1000 * seconds / n:>14.2f} {peak / 1e6:>14.0f}"
                      f"   (whole process {wall:.1f}s)")
            low, high = SIZES
            for shape, rows in results.items():
                (t0, m0), (t1, m1) = rows[low], rows[high]
                print(f"{shape}: per-unit time x{t1 / t0:.2f} and peak memory x{m1 / m0:.2f} "
                      f"from {low} to {high} units")
        finally:
            prefect_server.stop()


if __name__ == "__main__":
    main()
