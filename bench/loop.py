"""What a `loop` step costs on top of the user's own loop, against a running Prefect server.

(1) Overhead per generation without checkpoints: a loop of N = 100, 1000, 3000 generations
    (`lmflow.run`, the loop's own `output.seconds`) vs. the same body called in a plain
    `for` loop on the same state. Overhead per generation = (loop - direct) / N. Two
    bodies: a trivial one (a counter) and the coach example's genetic algorithm with a
    population of 70 (~1 ms of real work). 3 runs each, min and median. Targets: under
    2 ms per generation, flat in N (the growth ratio between N = 100 and 3000 near 1).
(2) One analysis cycle: a loop with a blocking checkpoint at every generation whose steps
    are reload_model + prompt (compact JSON, max_tokens 16, temperature 0) on the managed
    local engine, applied with an `apply:` mapping, vs. the same calls made directly on a
    LocalBackend (unload, load, chat) plus a dict update. Extra per cycle = median
    analysis seconds - median direct cycle. Target: under 50 ms.
(3) A slow coach: the LM Studio-compatible test server answering each chat after 2 s; a
    30-generation loop (0.1 s per generation) with a checkpoint every 5 generations, once
    blocking and once in the background: both wall times, and in the background when each
    advice was asked and applied and how many analyses were skipped (one still running).

Run: .venv/bin/python bench/loop.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the specs name loophelp:FUNCTION; the direct loops import it too

import loophelp  # noqa: E402

SIZES = (100, 1000, 3000)
REPEATS = 3
GA_POPULATION = 70
CYCLE_GENERATIONS = 6
CYCLE_ROUNDS = 3
SLOW_DELAY = 2.0
SLOW_GENERATIONS = 30
SLOW_EVERY = 5
SLOW_BODY = 0.1
KEY = "smollm2-135m-instruct"
# The tiny model writes compact JSON when told so: 11-12 tokens; max_tokens 8 cuts it.
MAX_TOKENS = 16
SYSTEM = 'Reply with compact JSON on one line, e.g. {"rate": 5}.'
SCHEMA = {"type": "object", "properties": {"rate": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["rate"], "additionalProperties": False}
BODIES = {"trivial": ("loophelp:init_counter", {}, "loophelp:count"),
          "ga": ("loophelp:init_ga", {"population": GA_POPULATION}, "loophelp:ga_generation")}


def user_text(generation: int | str) -> str:
    return f"Generation {generation}: pick a rate from 1 to 9."


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def loop_spec(folder: Path, name: str, body: str, n: int) -> Path:
    init, args, function = BODIES[body]
    return write(folder, name, f"""version: 1
name: {name}
defaults: {{cache: false}}
steps:
  - id: evolve
    loop:
      generations: {n}
      init: {{function: "{init}", args: {json.dumps(args)}}}
      body: "{function}"
""")


def prompt_options() -> str:
    return (f"{{model: coach, system: {json.dumps(SYSTEM)}, "
            f"user: \"{user_text('${{ loop.generation }}')}\", temperature: 0, "
            f"max_tokens: {MAX_TOKENS}, response_schema: {json.dumps(SCHEMA)}}}")


def cycle_spec(folder: Path) -> Path:
    return write(folder, "loop-bench-cycle", f"""version: 1
name: loop-bench-cycle
server: {{backend: local}}
models: {{coach: {{key: {KEY}, context_length: 1024}}}}
defaults: {{cache: false, retries: 0, timeout: 120s}}
steps:
  - id: evolve
    loop:
      generations: {CYCLE_GENERATIONS}
      init: loophelp:init_counter
      body: loophelp:count
      checkpoints:
        - every: 1
          mode: blocking
          steps:
            - id: fresh
              reload_model: {{model: coach}}
            - id: advise
              prompt: {prompt_options()}
          apply:
            rate: {{min: 1, max: 9}}
""")


def slow_spec(folder: Path, url: str, mode: str) -> Path:
    name = f"loop-bench-slow-{mode}"
    return write(folder, name, f"""version: 1
name: {name}
server: {{backend: lmstudio, url: "{url}"}}
models: {{coach: {{key: {KEY}, context_length: 1024}}}}
defaults: {{cache: false, retries: 0, timeout: 120s}}
steps:
  - id: warm
    load_model: {{model: coach}}
  - id: evolve
    after: [warm]
    loop:
      generations: {SLOW_GENERATIONS}
      init: {{function: loophelp:init_sleepy, args: {{seconds: {SLOW_BODY}}}}}
      body: loophelp:sleepy
      checkpoints:
        - every: {SLOW_EVERY}
          mode: {mode}
          steps:
            - id: advise
              prompt: {prompt_options()}
          apply:
            rate: {{min: 1, max: 9}}
""")


def run_loop(spec: Path) -> dict[str, Any]:
    """The loop step's output of one `lmflow.run` (stops the benchmark when the run failed)."""
    import lmflow

    result = lmflow.run(spec, refresh_cache=True)
    failed = [s for s in result.steps if s.status != "completed"]
    if failed or result.error:
        details = "; ".join(f"{s.id}: {s.status} {s.error!r}" for s in failed)
        raise SystemExit(f"{spec.name}: the run did not complete: {result.error or ''} {details}")
    return next(s for s in result.steps if s.kind == "loop").output


def direct_loop(body: str, n: int) -> float:
    init, args, function = BODIES[body]
    state = getattr(loophelp, init.partition(":")[2])(**args)
    step = getattr(loophelp, function.partition(":")[2])
    started = time.perf_counter()
    for g in range(1, n + 1):
        step(state, g)
    return time.perf_counter() - started


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def figure_overhead(folder: Path) -> None:
    print(f"\n(1) loop overhead per generation, no checkpoints ({REPEATS} runs each: min / median)")
    print("    overhead/gen = (loop output.seconds - plain for loop seconds) / N; target < 2 ms, flat in N")
    print(f"    {'body':<8} {'N':>5}  {'plain loop (ms)':>21}  {'loop step (ms)':>17}  "
          f"{'overhead/gen (ms)':>17}")
    for body in BODIES:
        medians = {}
        for n in SIZES:
            spec = loop_spec(folder, f"loop-bench-{body}-{n}", body, n)
            direct, loop, over = [], [], []
            for _ in range(REPEATS):
                d = direct_loop(body, n)
                output = run_loop(spec)
                assert output["generations"] == n, output["generations"]
                direct.append(d)
                loop.append(output["seconds"])
                over.append((output["seconds"] - d) / n)
            medians[n] = statistics.median(over)
            print(f"    {body:<8} {n:>5}  {ms(min(direct)):>9} / {ms(statistics.median(direct)):<9}"
                  f"  {min(loop) * 1000:>7.0f} / {statistics.median(loop) * 1000:<7.0f}"
                  f"  {ms(min(over)):>7} / {ms(medians[n]):<7}")
        low, high = SIZES[0], SIZES[-1]
        worst = max(medians.values())
        print(f"    {body}: median overhead/gen at N={high} / at N={low} = "
              f"{medians[high] / medians[low]:.2f}x; worst median {worst * 1000:.3f} ms "
              f"(target < 2 ms: {'met' if worst < 0.002 else 'MISSED'})")


def direct_cycles(backend: Any, model: Any, n: int) -> list[dict[str, float]]:
    """What one analysis does, made directly: reload, ask, parse, set the state's field."""
    from lmflow.backends.base import ChatRequest

    state = loophelp.init_counter()
    cycles = []
    for g in range(1, n + 1):
        loophelp.count(state, g)
        started = time.perf_counter()
        backend.unload(model)
        backend.load(model)
        loaded = time.perf_counter()
        response = backend.chat(ChatRequest(
            model=model, messages=[{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": user_text(g)}],
            sampling={"temperature": 0, "max_tokens": MAX_TOKENS}, response_schema=SCHEMA, timeout=120))
        advice = json.loads(response.text)
        state["rate"] = min(9, max(1, int(advice["rate"])))
        done = time.perf_counter()
        cycles.append({"reload": loaded - started, "prompt": done - loaded, "cycle": done - started})
    return cycles


def figure_cycle(folder: Path) -> None:
    from lmflow.backends.local import LocalBackend
    from lmflow.spec.model import ModelConfig, ServerConfig

    spec = cycle_spec(folder)
    direct: list[dict[str, float]] = []
    analyses: list[dict[str, Any]] = []
    loop_seconds: list[float] = []
    by_round: list[list[dict[str, Any]]] = []
    for _ in range(CYCLE_ROUNDS):
        backend = LocalBackend(ServerConfig(name="default"), spec_dir=folder)
        model = ModelConfig(alias="coach", key=KEY, context_length=1024)
        try:
            direct += direct_cycles(backend, model, CYCLE_GENERATIONS)
        finally:
            backend.close()
        output = run_loop(spec)
        analyses += output["analyses"]
        by_round.append(output["analyses"])
        loop_seconds.append(output["seconds"])
    statuses: dict[str, int] = {}
    for a in analyses:
        statuses[a["status"]] = statuses.get(a["status"], 0) + 1
    n = len(analyses)
    print(f"\n(2) one analysis cycle: reload_model + prompt (max_tokens {MAX_TOKENS}) + apply, blocking, "
          f"every generation; {CYCLE_ROUNDS} rounds of {CYCLE_GENERATIONS} generations, median of {n}")
    print(f"    analyses: {', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}; "
          f"advice seen: {sorted({json.dumps(a['advice']) for a in analyses})}")
    print(f"    {'median (min)':<30} {'direct (ms)':>16} {'in the loop (ms)':>18} {'extra (ms)':>11}")
    rows = [("reload (unload + load)", [c["reload"] for c in direct],
             [a["steps"]["fresh"]["seconds"] for a in analyses if "fresh" in a["steps"]]),
            ("prompt (chat + parse)", [c["prompt"] for c in direct],
             [a["steps"]["advise"]["seconds"] for a in analyses if "advise" in a["steps"]]),
            ("whole cycle (analysis seconds)", [c["cycle"] for c in direct],
             [a["seconds"] for a in analyses])]
    for label, d, o in rows:
        dm, om = statistics.median(d), statistics.median(o)
        print(f"    {label:<30} {dm * 1000:>7.1f} ({min(d) * 1000:>6.1f}) "
              f"{om * 1000:>9.1f} ({min(o) * 1000:>6.1f}) {(om - dm) * 1000:>11.1f}")
    direct_cycle = statistics.median(c["cycle"] for c in direct)
    extra = statistics.median(a["seconds"] for a in analyses) - direct_cycle
    verdict = "met" if extra < 0.05 else "MISSED"
    print(f"    extra per cycle {extra * 1000:.1f} ms (target < 50 ms: {verdict}); "
          "the engine's restart varies by more than that from cycle to cycle")
    # an analysis' seconds end when its answer is in; applying it, recording it (the report
    # published to Prefect's UI) and saving the state come after, on the loop's time
    outside = statistics.median((seconds - sum(a["seconds"] for a in done)) / CYCLE_GENERATIONS
                                for seconds, done in zip(loop_seconds, by_round, strict=True))
    print(f"    the loop's time outside the analyses, per generation ((output.seconds - sum of analysis "
          f"seconds) / {CYCLE_GENERATIONS}): {outside * 1000:.1f} ms "
          "(body, apply, record + report, state save)")


def start_test_server(folder: Path) -> tuple[subprocess.Popen, str]:
    config = folder / "slow-coach.yaml"
    config.write_text(f"models:\n  - key: {KEY}\n    max_context_length: 4096\n"
                      f"delay_seconds: {SLOW_DELAY}\n")
    lmflow = Path(sys.executable).parent / "lmflow"
    proc = subprocess.Popen([str(lmflow), "testing", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip() if proc.stdout else ""
    if not url.startswith("http://127.0.0.1:"):
        stop_test_server(proc)
        raise SystemExit(f"the test server did not start (printed {url!r})")
    return proc, url


def stop_test_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def figure_slow_coach(folder: Path, url: str) -> None:
    outputs = {mode: run_loop(slow_spec(folder, url, mode)) for mode in ("blocking", "background")}
    body_only = SLOW_GENERATIONS * SLOW_BODY
    print(f"\n(3) a slow coach (test server, {SLOW_DELAY:g} s per chat): {SLOW_GENERATIONS} generations of "
          f"{SLOW_BODY:g} s (~{body_only:g} s of body), a prompt + apply every {SLOW_EVERY}")
    for mode, output in outputs.items():
        seconds = [a["seconds"] for a in output["analyses"] if a["seconds"] is not None]
        chats = [a["steps"]["advise"]["meta"]["seconds"] for a in output["analyses"]
                 if a["steps"].get("advise", {}).get("status") == "completed"]
        print(f"    {mode:<10} wall {output['seconds']:6.2f} s; {len(seconds)} analyses ran, "
              f"{sum(seconds):.2f} s in all ({min(seconds):.2f}-{max(seconds):.2f} s each, of which the "
              f"coach's answer {min(chats):.2f}-{max(chats):.2f} s); final rate {output['state']['rate']}")
    blocking, background = outputs["blocking"]["seconds"], outputs["background"]["seconds"]
    print(f"    blocking / background = {blocking / background:.2f}x")
    analyses = outputs["background"]["analyses"]
    pairs = ", ".join(f"({a['asked_at']}, {a['applied_at']})" for a in analyses if a["status"] != "skipped")
    skipped = [a["asked_at"] for a in analyses if a["status"] == "skipped"]
    late = [a["asked_at"] for a in analyses if a["status"] == "late"]
    print(f"    background (asked_at, applied_at): {pairs}")
    print(f"    background: {len(skipped)} skipped because one was still running (asked at {skipped}); "
          f"{len(late)} answered after the last generation, not applied (asked at {late})")


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["LMFLOW_HOME"] = str(folder / "home")
        os.environ["PREFECT_HOME"] = str(folder / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        from lmflow.backends.local import free_port
        from lmflow.prefect import server as prefect_server

        # a port of its own: with the default (4200 when free) a server another process starts
        # there at the same moment answers start()'s health check in place of ours
        server = prefect_server.start(port=free_port())
        slow = None
        try:
            run_loop(loop_spec(folder, "loop-bench-warm", "trivial", 10))  # imports Prefect, registers
            print(f"Prefect server {server.url}; Python {sys.version.split()[0]}, {os.cpu_count()} cores")
            figure_overhead(folder)
            figure_cycle(folder)
            slow, url = start_test_server(folder)
            figure_slow_coach(folder, url)
        finally:
            if slow is not None:
                stop_test_server(slow)
            prefect_server.stop()
    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
