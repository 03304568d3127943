"""Chains: a map over another map's output costs what the first map costs (O(items), not O(items^2)).

One `lmflow run` process against a running Prefect server runs a spec with a python map of N
items (`first`), a map over its output (`second`) and one step over the second's output
(`after`). Each step's wall time comes from the run's record; what is printed is the second
map's time over the first's (target: at most 1.2) and the step after it, for each N. A
dependent waits for one edge per step it depends on (a map's items join in one task run
named after the map), never for every upstream item.
Run: .venv/bin/python bench/chain.py [N ...]   (default: 600 2000)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELPER = "def f(x):\n    return {'x': x}\n\n\ndef count(xs):\n    return len(xs)\n"


def spec(n: int) -> str:
    return f"""version: 1
name: chain-{n}
defaults: {{cache: false, max_parallel: 4}}
steps:
  - id: first
    foreach: {{file: items{n}.jsonl}}
    python: {{function: "chainhelp:f", args: {{x: "${{{{ item.i }}}}"}}}}
  - id: second
    foreach: "${{{{ steps.first.output }}}}"
    python: {{function: "chainhelp:f", args: {{x: "${{{{ item.x }}}}"}}}}
  - id: after
    python: {{function: "chainhelp:count", args: {{xs: "${{{{ steps.second.output }}}}"}}}}
"""


def run(path: Path) -> tuple[dict, float]:
    lmflow = Path(sys.executable).parent / "lmflow"
    out, err = path.with_suffix(".out"), path.with_suffix(".err")
    started = time.perf_counter()
    with out.open("w") as stdout, err.open("w") as stderr:  # files: a pipe would fill up and block
        proc = subprocess.run([str(lmflow), "run", str(path), "--json"], stdout=stdout, stderr=stderr)
    if proc.returncode != 0:
        raise SystemExit(f"lmflow run failed:\n{err.read_text()[-3000:]}")
    return json.loads(out.read_text()), time.perf_counter() - started


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [600, 2000]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["LMFLOW_HOME"] = str(folder / "home")
        os.environ["PREFECT_HOME"] = str(folder / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        from lmflow.prefect import server as prefect_server

        (folder / "chainhelp.py").write_text(HELPER)
        for n in sizes:
            (folder / f"items{n}.jsonl").write_text("".join(json.dumps({"i": i}) + "\n" for i in range(n)))
            (folder / f"chain{n}.yaml").write_text(spec(n))
        server = prefect_server.start()
        try:
            (folder / "warm.yaml").write_text(spec(20))
            (folder / "items20.jsonl").write_text("".join(json.dumps({"i": i}) + "\n" for i in range(20)))
            run(folder / "warm.yaml")  # registers the flow, warms the server
            print(f"Prefect server {server.url}; python steps, max_parallel 4")
            print(f"{'items':>7} {'first (s)':>10} {'second (s)':>11} {'second/first':>13} {'after (s)':>10}")
            for n in sizes:
                result, wall = run(folder / f"chain{n}.yaml")
                steps = {s["id"]: s for s in result["steps"]}
                assert steps["after"]["output"] == n, steps["after"]
                first, second = steps["first"]["seconds"], steps["second"]["seconds"]
                print(f"{n:>7} {first:>10.2f} {second:>11.2f} {second / first:>13.2f} "
                      f"{steps['after']['seconds']:>10.2f}   (whole process {wall:.1f}s)")
        finally:
            prefect_server.stop()


if __name__ == "__main__":
    main()
