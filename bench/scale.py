"""Scale: maps of 1,000, 10,000 and 100,000 items, 100- and 1,000-step specs, a 1 GB JSONL and a
filter over a 500,000-line file; time per item/step, peak memory, what the run wrote.

Each run is a whole `lmflow run` process against a running Prefect server, with a trivial
python step (no model: what is measured is lmflow + Prefect). For each shape it prints the
step's (or the run's) wall time per item/step and the peak RSS of the lmflow process (sampled
every 20 ms); then how both change with N: flat per-item time and flat memory mean the cost
does not grow with N. Steps and items run 4 at once (max_parallel 4). The dataset shapes: a
map over a 1 GB JSONL of 10,000 rows of 100 kB (each item reads its row's text), and
`when: index < 3` over a 500,000-line JSONL (the journal and record sizes are printed: an item
whose condition is false is counted, not written).
Run: .venv/bin/python bench/scale.py [--quick] [--cache]   (--quick: maps up to 10,000, no 1 GB
file; --cache: the maps with the step cache on, each run twice: every item computed and stored,
then every item read back)
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

MAP_SIZES = (1_000, 10_000, 100_000)
STEP_SIZES = (100, 1000)
HELPER = "def f(x):\n    return {'x': x, 'twice': x * 2}\n\n\ndef size(text):\n    return len(text)\n"


def map_spec(n: int, cache: bool = False) -> str:
    return f"""version: 1
name: scale-map-{n}
params: {{n: {n}}}
defaults: {{cache: {str(cache).lower()}, max_parallel: 4}}
steps:
  - id: each{n}                # (its own step cache keys at each size)
    foreach: {{file: items{n}.jsonl}}
    python: {{function: "scalehelp:f", args: {{x: "${{{{ item.i }}}}"}}}}
"""


def steps_spec(n: int) -> str:
    lines = ["version: 1", f"name: scale-steps-{n}", "defaults: {cache: false, max_parallel: 4}", "steps:"]
    for i in range(n):
        lines += [f"  - id: s{i}", f"    python: {{function: 'scalehelp:f', args: {{x: {i}}}}}"]
    return "\n".join(lines) + "\n"


def file_spec(name: str, when: str | None, function: str, arg: str) -> str:
    return f"""version: 1
name: scale-{name.split('.')[0]}
defaults: {{cache: false, max_parallel: 4}}
steps:
  - id: each
    foreach: {{file: {name}}}
""" + (f"    when: {when}\n" if when else "") \
        + f"""    python: {{function: "scalehelp:{function}", args: {{{arg}}}}}
"""


def write_rows(path: Path, rows: int, text: int) -> None:
    """`rows` JSONL lines, each with `text` characters of text."""
    filler = "x" * text
    with path.open("w") as file:
        for i in range(rows):
            file.write(json.dumps({"i": i, "text": filler}) + "\n")


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


def row(shape: str, seconds: float, n: int, peak: int, wall: float) -> None:
    print(f"{shape:<22} {seconds:>9.2f} {1000 * seconds / n:>14.3f} {peak / 1e6:>14.0f}"
          f"   (whole process {wall:.1f}s)")


def main() -> None:
    quick, cache = "--quick" in sys.argv, "--cache" in sys.argv
    map_sizes = MAP_SIZES[:2] if quick else MAP_SIZES
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["LMFLOW_HOME"] = str(folder / "home")
        os.environ["PREFECT_HOME"] = str(folder / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        from lmflow.prefect import server as prefect_server

        (folder / "scalehelp.py").write_text(HELPER)
        server = prefect_server.start()
        try:
            for n in map_sizes:
                rows = "".join(json.dumps({"i": i}) + "\n" for i in range(n))
                (folder / f"items{n}.jsonl").write_text(rows)
                (folder / f"map{n}.yaml").write_text(map_spec(n, cache))
            for n in STEP_SIZES:
                (folder / f"steps{n}.yaml").write_text(steps_spec(n))
            (folder / "warm.yaml").write_text(map_spec(map_sizes[0]))
            run(folder / "warm.yaml")  # registers the flow, warms the server (and caches nothing)
            print(f"Prefect server {server.url}; python steps, max_parallel 4")
            print(f"{'shape':<22} {'wall (s)':>9} {'per unit (ms)':>14} {'peak RSS (MB)':>14}")
            maps: dict[int, tuple[float, int]] = {}
            for n in map_sizes:
                result, wall, peak = run(folder / f"map{n}.yaml")
                seconds = result["steps"][0]["seconds"]
                assert result["steps"][0]["items"]["completed"] == n
                maps[n] = (seconds / n, peak)
                row(f"map of {n:,}", seconds, n, peak, wall)
                if cache:  # again: every item from the step cache
                    result, wall, peak = run(folder / f"map{n}.yaml")
                    seconds = result["steps"][0]["seconds"]
                    assert result["steps"][0]["items"]["cached"] == n
                    row("  again, cached", seconds, n, peak, wall)
            steps: dict[int, tuple[float, int]] = {}
            for n in STEP_SIZES:
                result, wall, peak = run(folder / f"steps{n}.yaml")
                seconds = result["seconds"]
                assert sum(s["status"] == "completed" for s in result["steps"]) == n
                steps[n] = (seconds / n, peak)
                row(f"{n:,} steps", seconds, n, peak, wall)
            for shape, rows in (("map", maps), ("steps", steps)):
                sizes = sorted(rows)
                for low, high in zip(sizes, sizes[1:], strict=False):
                    (t0, m0), (t1, m1) = rows[low], rows[high]
                    print(f"{shape}: per-unit time x{t1 / t0:.2f} and peak memory x{m1 / m0:.2f} "
                          f"from {low:,} to {high:,} units")

            # a filter over a big file: `when: index < 3` computes 3 items of 500,000
            write_rows(folder / "lines.jsonl", 500_000, 60)
            filtering = file_spec("lines.jsonl", "index < 3", "f", 'x: "${{ item.i }}"')
            (folder / "filter.yaml").write_text(filtering)
            result, wall, peak = run(folder / "filter.yaml")
            each = result["steps"][0]
            assert each["items"]["completed"] == 3 and each["items"]["skipped"] == 500_000 - 3
            runs = folder / "home" / "runs"
            written = sum(p.stat().st_size for p in runs.glob(f"{result['run_id']}.*"))
            print(f"when: index < 3 over a {(folder / 'lines.jsonl').stat().st_size / 1e6:.0f} MB JSONL of "
                  f"500,000 lines: step {each['seconds']:.1f}s, peak RSS {peak / 1e6:.0f} MB, journal and "
                  f"record {written / 1e3:.0f} kB")
            if not quick:  # a 1 GB JSONL: 10,000 rows of 100 kB, each item reads its row
                write_rows(folder / "big.jsonl", 10_000, 100_000)
                reading = file_spec("big.jsonl", None, "size", 'text: "${{ item.text }}"')
                (folder / "big.yaml").write_text(reading)
                result, wall, peak = run(folder / "big.yaml")
                each = result["steps"][0]
                assert each["items"]["completed"] == 10_000 and each["output"][0] == 100_000
                size = (folder / "big.jsonl").stat().st_size
                print(f"map over a {size / 1e9:.2f} GB JSONL (10,000 rows of 100 kB): "
                      f"{1000 * each['seconds'] / 10_000:.2f} ms an item, peak RSS {peak / 1e6:.0f} MB "
                      f"(the file is {size / max(peak, 1):.1f}x that)")
        finally:
            prefect_server.stop()


if __name__ == "__main__":
    main()
