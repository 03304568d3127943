"""One map across worker processes: items per second with 1 and 2 task workers, and the cost per chunk.

The map of bench/ceiling.py (a `prompt` step against the no-CPU server, 100 ms answers, 64 in flight
per worker: `lmflow worker --tasks --limit 1`, one chunk at a time each) runs three ways in the same
run, against one Prefect server:
(a) in the run's own process (no `distribute`): the local path;
(b) `distribute: true` with one task worker;
(c) `distribute: true` with two task workers, each a process with its own lmflow home (as if on
    two machines), sharing LMFLOW_SHARED with the run.
Printed: each map's seconds (run record) and items per second; (c) / (b), the issue's target being
>= 1.6x on a 2-core box; and the extra seconds per chunk of the distributed path, ((b) - (a)) /
chunks: Prefect's queue, the items' trip through the shared folder, the worker's spec and session.
Run: .venv/bin/python bench/distributed.py [--quick]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from ceiling import Server, lmflow_map  # noqa: E402 - the bench's own folder, put on the path above

QUICK = "--quick" in sys.argv
ITEMS = 2000 if QUICK else 8000
PARALLEL, DELAY = 64, 0.1


def spec(folder: Path, url: str, distribute: bool) -> Path:
    data = folder / "items.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(ITEMS)))
    path = folder / f"dist-{'on' if distribute else 'off'}.yaml"
    path.write_text(f"""version: 1
name: dist-{'on' if distribute else 'off'}
server: {{backend: openai, url: "{url}", parallel: {PARALLEL * 2}}}
models: {{fast: {{key: nocpu}}}}
defaults: {{cache: false, max_parallel: {PARALLEL}}}
steps:
  - id: ask
    foreach: {{file: {data.name}}}
    parallel: {PARALLEL}
    distribute: {'true' if distribute else 'false'}
    prompt: {{model: fast, user: "item ${{{{ item.i }}}}", max_tokens: 1}}
""")
    return path


def workers(folder: Path, count: int, env: dict[str, str]) -> list[subprocess.Popen]:
    """`count` task workers, each with a home of its own, connected when this returns."""
    lmflow = Path(sys.executable).parent / "lmflow"
    procs = []
    for n in range(count):
        home = folder / f"worker{n}-{time.monotonic_ns()}"
        home.mkdir()
        procs.append(subprocess.Popen([str(lmflow), "worker", "--tasks", "--limit", "1"], cwd=folder,
                                      env={**env, "LMFLOW_HOME": str(home)}, stdout=subprocess.DEVNULL,
                                      stderr=open(home / "stderr.txt", "w"), start_new_session=True))
    deadline = time.monotonic() + 60
    while connected(env["PREFECT_API_URL"]) < count:
        if time.monotonic() > deadline:
            raise SystemExit("the task workers did not connect within 60 s")
        time.sleep(0.2)
    return procs


def connected(api: str) -> int:
    answer = httpx.post(f"{api}/task_workers/filter", json={}, timeout=30).json()
    return sum(1 for w in answer if any(k.startswith("remote_chunk") for k in w["task_keys"]))


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 30  # gone from Prefect's list before the next case counts its own
    while connected(os.environ["PREFECT_API_URL"]) and time.monotonic() < deadline:
        time.sleep(0.2)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["LMFLOW_HOME"] = str(folder / "home")
        os.environ["PREFECT_HOME"] = str(folder / "prefect")
        os.environ["LMFLOW_SHARED"] = str(folder / "shared")
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
        from lmflow.engine.scheduler import chunk_size
        from lmflow.prefect import server as prefect_server
        from lmflow.spec import load_spec

        server = Server(folder)
        prefect = prefect_server.start()
        os.environ["PREFECT_API_URL"] = prefect.url
        try:
            server.reset(DELAY)
            per_chunk = chunk_size(load_spec(spec(folder, server.url, True)).steps[0], ITEMS, PARALLEL)
            chunks = -(-ITEMS // per_chunk)
            print(f"no-CPU server {server.url}, {DELAY * 1000:.0f} ms answers; {ITEMS} items in {chunks} "
                  f"chunks, {PARALLEL} in flight per worker; {os.cpu_count()} cores")
            local, _ = lmflow_map(spec(folder, server.url, False))
            print(f"in the run's process: {local:.2f} s, {ITEMS / local:.0f} items/s")
            seconds = {}
            for count in (1, 2):
                procs = workers(folder, count, dict(os.environ))
                try:
                    lmflow_map(spec(folder, server.url, True))  # (warms the workers' sessions)
                    server.reset(DELAY)
                    seconds[count], _ = lmflow_map(spec(folder, server.url, True))
                finally:
                    stop(procs)
                print(f"distributed, {count} worker{'s' if count > 1 else ''}: {seconds[count]:.2f} s, "
                      f"{ITEMS / seconds[count]:.0f} items/s (most in flight {server.most})")
            extra = (seconds[1] - local) / chunks
            print(f"2 workers / 1 worker: {seconds[1] / seconds[2]:.2f}x; the distributed path's extra "
                  f"seconds per chunk (1 worker against the run's process): {extra:+.2f}")
        finally:
            prefect_server.stop()
            server.stop()


if __name__ == "__main__":
    main()
