"""A 200-item map through lmflow vs. a plain httpx thread pool, at 1, 2 and 4 requests in flight.

One llama-server (SmolLM2-135M, 4 slots, unified KV cache: the managed engine's
binary and flags) answers both. For each concurrency N:
(a) a plain client: a ThreadPoolExecutor(N) posting the 200 chat completions;
(b) `lmflow run` of a spec whose one step maps the same 200 prompts over a
    JSONL dataset with `parallel: N` (server.parallel N, max_parallel N,
    no caches), against a running Prefect server.
(c) a bare Prefect flow sending the same requests, one task run per item, N
    at a time (a sliding window of submits, as lmflow runs a map): what one
    Prefect task run per item costs without lmflow.
Throughput share = plain seconds / lmflow seconds for the map itself (the map
step's wall time from the run record; the whole process, with Python start,
Prefect import and flow set-up, is printed too), and the same for the bare
Prefect flow (its first submit to its last result). Target: lmflow's share
>= 90%. Also the speed-up of N=4 over N=1 for plain and lmflow.
Run: .venv/bin/python bench/map.py [ITEMS]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

BARE = sys.argv[1:2] == ["--bare"]  # map.py --bare URL N NONCE ITEMS: the bare Prefect map, (c)
ITEMS = int(sys.argv[5] if BARE else sys.argv[1]) if len(sys.argv) > 1 else 200
LEVELS = (1, 2, 4)
MAX_TOKENS = 8


def prompts(nonce: str) -> list[str]:
    return [f"{nonce} item {i}: name one colour." for i in range(ITEMS)]


def plain(url: str, texts: list[str], parallel: int) -> float:
    body = {"model": "smol", "temperature": 0, "max_tokens": MAX_TOKENS}
    with httpx.Client(base_url=url, timeout=120) as http:
        def ask(text: str) -> str:
            messages = [{"role": "user", "content": text}]
            r = http.post("/v1/chat/completions", json={**body, "messages": messages})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        started = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            answers = list(pool.map(ask, texts))
        elapsed = time.perf_counter() - started
    assert len(answers) == len(texts)
    return elapsed


def bare_prefect(url: str, texts: list[str], parallel: int) -> float:
    """(c), run in a process of its own: seconds of the map."""
    import concurrent.futures

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    body = {"model": "smol", "temperature": 0, "max_tokens": MAX_TOKENS}
    http = httpx.Client(base_url=url, timeout=120)

    @task(cache_policy=NO_CACHE, persist_result=False, task_run_name="ask[{index}]")
    def ask(text: str, index: int) -> str:
        r = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": text}]})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    @flow(name=f"bare-map-{parallel}", persist_result=False, task_runner=ThreadPoolTaskRunner(parallel))
    def bare_map() -> float:
        started = time.perf_counter()
        running, answers = set(), 0
        for index, text in enumerate(texts):
            if len(running) >= parallel:
                done, running = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
                answers += sum(1 for f in done if f.result().is_completed())
            running.add(ask.submit(text, index).wrapped_future)
        answers += sum(1 for f in concurrent.futures.wait(running)[0] if f.result().is_completed())
        assert answers == len(texts), answers
        return time.perf_counter() - started

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), http:
        return bare_map()


def through_bare_prefect(url: str, api: str, nonce: str, parallel: int) -> float:
    from lmflow.prefect import server as prefect_server

    out = subprocess.run([sys.executable, __file__, "--bare", url, str(parallel), nonce, str(ITEMS)],
                         capture_output=True, text=True,
                         env={**os.environ, **prefect_server.QUIET, "PREFECT_API_URL": api})
    if out.returncode != 0:
        raise SystemExit(f"the bare Prefect map failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.split()[-1])


def spec_text(url: str, parallel: int) -> str:
    return f"""version: 1
name: map-bench-{parallel}
server: {{backend: openai, url: "{url}", parallel: {parallel}}}
models: {{smol: {{key: smol}}}}
defaults: {{cache: false, max_parallel: {parallel}, timeout: 120s}}
steps:
  - id: ask
    foreach: {{file: items.jsonl}}
    parallel: {parallel}
    prompt: {{model: smol, user: "${{{{ item.text }}}}", temperature: 0, max_tokens: {MAX_TOKENS}}}
"""


def through_lmflow(folder: Path, url: str, texts: list[str], parallel: int) -> tuple[float, float]:
    (folder / "items.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = folder / f"map-{parallel}.yaml"
    spec.write_text(spec_text(url, parallel))
    lmflow = Path(sys.executable).parent / "lmflow"
    started = time.perf_counter()
    out = subprocess.run([str(lmflow), "run", str(spec), "--json"], capture_output=True, text=True)
    whole = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"lmflow run failed:\n{out.stderr[-3000:]}")
    step = json.loads(out.stdout)["steps"][0]
    assert step["items"]["completed"] == len(texts), step["items"]
    return step["seconds"], whole


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["LMFLOW_HOME"] = str(folder / "home")
        os.environ["PREFECT_HOME"] = str(folder / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        from lmflow.backends.catalog import llama_server_binary, locate
        from lmflow.backends.local import LlamaServer
        from lmflow.prefect import server as prefect_server

        engine = LlamaServer(llama_server_binary(), locate("smollm2-135m-instruct", folder),
                             key="smollm2-135m-instruct", context_length=1024, alias="smol",
                             parallel=max(LEVELS))
        engine.start()
        server = prefect_server.start()
        try:
            plain(engine.url, prompts("warm")[:8], 4)
            through_lmflow(folder, engine.url, prompts("warm")[:4], 2)  # registers the flow
            through_bare_prefect(engine.url, server.url, "warm", 2)
            print(f"{ITEMS} items, max_tokens {MAX_TOKENS}, llama-server -np {max(LEVELS)} at {engine.url}, "
                  f"Prefect server {server.url}")
            print(f"{'N':>2}  {'plain (s)':>9}  {'lmflow map (s)':>14}  {'share':>6}  {'lmflow run (s)':>14}"
                  f"  {'bare Prefect map (s)':>20}  {'share':>6}")
            rows = {}
            for n in LEVELS:
                texts = prompts(f"run{n}")
                a = plain(engine.url, texts, n)
                b, whole = through_lmflow(folder, engine.url, texts, n)
                c = through_bare_prefect(engine.url, server.url, f"bare{n}", n)
                rows[n] = (a, b)
                print(f"{n:>2}  {a:>9.2f}  {b:>14.2f}  {a / b:>6.1%}  {whole:>14.2f}  "
                      f"{c:>20.2f}  {a / c:>6.1%}")
            low, high = LEVELS[0], LEVELS[-1]
            print(f"speed-up of parallel {high} over {low}: plain {rows[low][0] / rows[high][0]:.2f}x, "
                  f"lmflow {rows[low][1] / rows[high][1]:.2f}x")
            worst = min(a / b for a, b in rows.values())
            verdict = "met" if worst >= 0.9 else "MISSED"
            print(f"lowest throughput share {worst:.1%} (target >= 90%: {verdict})")
        finally:
            prefect_server.stop()
            engine.stop()


if __name__ == "__main__":
    if BARE:
        print(bare_prefect(sys.argv[2], prompts(sys.argv[4]), int(sys.argv[3])))
    else:
        main()
