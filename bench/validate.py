"""Wall time of `lmflow validate` on a 50-step spec (a fresh process each time: imports count)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 50
RUNS = 5


def make_spec(folder: Path) -> Path:
    lines = ["version: 1", "name: big", "params: {topic: moon}",
             "models:", "  smol: {key: smollm2-135m-instruct}", "steps:"]
    for i in range(STEPS):
        prev = f" after ${{{{ steps.s{i - 1}.output }}}}" if i else ""
        lines += [f"  - id: s{i}", "    prompt:", "      model: smol",
                  f"      user: \"step {i} about ${{{{ params.topic }}}}{prev}\"",
                  "      max_tokens: 8"]
    path = folder / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    lmflow = Path(sys.executable).parent / "lmflow"
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_spec(Path(tmp))
        baseline, timings = [], []
        for _ in range(RUNS):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            baseline.append(time.perf_counter() - started)
            started = time.perf_counter()
            out = subprocess.run([str(lmflow), "validate", str(spec)], capture_output=True, text=True)
            timings.append(time.perf_counter() - started)
            assert out.returncode == 0, out.stderr
    med, base = statistics.median(timings), statistics.median(baseline)
    print(f"lmflow validate, {STEPS}-step spec: median {med:.3f}s wall over {RUNS} runs "
          f"(bare python start {base:.3f}s; lmflow's own {med - base:.3f}s); target < 0.5s: "
          f"{'met' if med < 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
