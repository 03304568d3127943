"""Fallback chains, retries, the breaker, the response cache and the resource guard, with real faults:
a server that is down, one killed mid-request, one too slow, one answering 5xx, one over its context,
a cache that is corrupt or not a folder, memory "pressure" through the guard's threshold."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import lmflow_cmd, wait_for

from lmflow.backends.local import free_port
from lmflow.resilience import BreakerBoard
from lmflow.spec.model import Breaker
from lmflow.testing.pytest_plugin import RunningServer

pytestmark = [pytest.mark.engine, pytest.mark.prefect, pytest.mark.slow]

#: the models of this file's own LM Studio stand-ins
SMOL_4096 = [{"key": "smollm2-135m-instruct", "max_context_length": 4096}]

HELPERS = """\
def guess(request):
    # plain code that always answers: the last link of a chain
    return {"topic": "unknown", "source": "heuristic", "failed": len(request["errors"])}


def broken(request):
    return {"topic": 42}


def bucket(request):
    # "similar enough" inputs share a cached answer: here, the first word of the question
    return request["messages"][-1]["content"].split()[0].lower()
"""

SCHEMA = '{type: object, required: [topic], properties: {topic: {type: string}}}'


def write_spec(folder: Path, body: str, name: str) -> Path:
    (folder / "fallbacks.py").write_text(HELPERS)
    path = folder / f"{name}.yaml"
    path.write_text(f"version: 1\nname: {name}\n" + textwrap.dedent(body))
    return path


def run_json(spec: Path, *args: str) -> tuple[dict, str]:
    out = lmflow_cmd("run", str(spec), "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_breaker_opens_after_k_failures_and_half_opens_after_the_cooldown() -> None:
    now = [0.0]
    board = BreakerBoard(Breaker(failures=3, cooldown=10), clock=lambda: now[0])
    for _ in range(2):
        board.failure("m")
    assert board.open_reason("m") is None
    board.failure("m")
    assert "circuit open after 3 consecutive failures" in board.open_reason("m")
    now[0] = 10.5
    assert board.open_reason("m") is None  # half-open: one call may test it
    board.failure("m")
    assert board.open_reason("m") is not None  # the test failed: open again
    board.success("m")
    assert board.open_reason("m") is None


def test_the_guard_reads_real_memory_and_cpu() -> None:
    import psutil

    from lmflow.resilience import ResourceGuard
    from lmflow.spec.model import Guard

    free = psutil.virtual_memory().available
    assert ResourceGuard(Guard(min_free_memory=free // 2)).shortage() is None
    short = ResourceGuard(Guard(min_free_memory=free * 4)).shortage()
    assert short.startswith("free memory ") and "is below guard.min_free_memory" in short
    cpu = ResourceGuard(Guard(min_cpu_idle=1.01))  # more idle than a CPU can be: always short
    assert "is below guard.min_cpu_idle 101%" in cpu.shortage()
    assert ResourceGuard(Guard(min_cpu_idle=0.0)).shortage() is None


def test_a_dead_primary_falls_back_and_the_breaker_skips_it(prefect_api: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: connection refused
    spec = write_spec(tmp_path, f"""\
        servers:
          default: {{backend: local}}
          down: {{backend: openai, url: "http://127.0.0.1:{port}"}}
        models:
          big: {{key: some-big-model, server: down, fallback: [smol, {{python: "fallbacks:guess"}}]}}
          smol: {{key: smollm2-135m-instruct, context_length: 1024}}
          sibling: {{key: other-model, server: down, fallback: [{{value: sibling}}]}}
        defaults: {{retries: 2, retry_delay: 0.2s, cache: false, max_parallel: 1}}
        breaker: {{failures: 2, cooldown: 1h}}
        steps:
          - id: a
            prompt: {{model: big, user: "Say hi.", max_tokens: 5}}
          - id: b
            prompt: {{model: big, user: "Say yes.", max_tokens: 5}}
          - id: c
            prompt: {{model: big, user: "Say no.", max_tokens: 5}}
          - id: schema
            prompt:
              model: big
              user: "Name a topic."
              response_schema: {SCHEMA}
              fallback: [{{python: "fallbacks:broken"}}, {{python: "fallbacks:guess"}}]
          - id: static
            prompt: {{model: big, user: "Anything.", fallback: [{{value: "no answer today"}}]}}
          - id: sibling
            prompt: {{model: sibling, user: "Anything."}}
        """, "dead-primary")
    result, stderr = run_json(spec)
    steps = {s["id"]: s for s in result["steps"]}
    for sid in "abc":
        assert steps[sid]["answered_by"] == {"link": 1, "target": "model smol"}
        assert isinstance(steps[sid]["output"], str) and steps[sid]["output"]
    # a refused connection with a fallback next is not retried: one attempt, then the fallback
    first = steps["a"]["errors"]
    assert [(e["error_type"], e["attempt"]) for e in first] == [("ConnectionRefused", 1)]
    assert f"cannot reach http://127.0.0.1:{port}" in first[0]["message"]
    # two failures opened the breaker: later steps skip the dead server without calling it
    assert steps["c"]["errors"][0]["error_type"] == "CircuitOpen"
    assert steps["c"]["errors"][0]["seconds"] == 0.0
    # plain code answers when no model can; an answer that breaks the schema moves on
    schema_errors = steps["schema"]["errors"]
    assert schema_errors[-1]["error_type"] == "InvalidResponse"
    assert "python fallbacks:broken fallback's answer does not match response_schema at topic" in (
        schema_errors[-1]["message"])
    assert steps["schema"]["output"] == {"topic": "unknown", "source": "heuristic", "failed": 2}
    assert steps["schema"]["answered_by"]["target"] == "python fallbacks:guess"
    assert steps["static"]["output"] == "no answer today"
    # the server does not answer: its other models are skipped too, without a call
    assert steps["sibling"]["errors"][0]["error_type"] == "CircuitOpen"
    assert result["stats"]["fallback_answers"] == 6
    # every error is listed in the run's result, and in Prefect's history (the task runs' logs)
    assert {e["step"] for e in result["errors"]} == {"a", "b", "c", "schema", "static", "sibling"}
    assert "Traceback" not in stderr

    def fallback_logs() -> list[str]:  # the server stores logs seconds late, and not all at once
        return [entry["message"] for entry in httpx.post(
            f"{prefect_api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [result["flow_run_id"]]}}}
        ).json() if "answered by" in entry["message"] or "ConnectionRefused" in entry["message"]]

    def complete(logs: list[str]) -> bool:
        return (any(m.startswith("model big (attempt 1): ConnectionRefused: cannot reach") for m in logs)
                and "answered by model smol" in logs)

    assert wait_for(lambda: complete(fallback_logs()), timeout=60), fallback_logs()


def test_the_summary_lists_errors_and_a_chain_without_an_answer_says_why(prefect_api: str,
                                                                        tmp_path: Path) -> None:
    port = free_port()
    spec = write_spec(tmp_path, f"""\
        servers:
          default: {{backend: local}}
          down: {{backend: openai, url: "http://127.0.0.1:{port}"}}
        models:
          big: {{key: some-big-model, server: down, fallback: [{{python: "fallbacks:broken"}}]}}
        defaults: {{retries: 1, retry_delay: 0.1s, cache: false}}
        steps:
          - id: ask
            prompt: {{model: big, user: "Name a topic.", response_schema: {SCHEMA}}}
          - id: after
            prompt: {{model: big, user: "Never asked: ${{{{ steps.ask.output.topic }}}}"}}
        """, "no-answer")
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"error: step 'ask' failed: all 2 links of the fallback chain failed: model big: cannot reach "
        f"http://127.0.0.1:{port} (ConnectError: [Errno 111] Connection refused): start the server or "
        "fix server.url; python fallbacks:broken: the python fallbacks:broken fallback's answer does not "
        "match response_schema at topic: 42 is not of type 'string' (add a python or value link at the "
        "end to always answer)")
    assert "errors (2):" in out.stdout
    assert "  ask model big attempt 1: ConnectionRefused: cannot reach" in out.stdout


def test_a_server_killed_mid_request_falls_back(
        prefect_api: str, tmp_path: Path, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    server = lmstudio_server_factory(models=SMOL_4096, crash_on_request=1)
    url = server.url
    spec = write_spec(tmp_path, f"""\
        servers:
          default: {{backend: local}}
          studio: {{backend: lmstudio, url: "{url}"}}
        models:
          remote: {{key: smollm2-135m-instruct, server: studio,
                    fallback: [{{python: "fallbacks:guess"}}]}}
        defaults: {{retries: 2, retry_delay: 0.1s, cache: false}}
        steps:
          - id: ask
            prompt: {{model: remote, user: "Name a topic.", response_schema: {SCHEMA}, max_tokens: 30}}
        """, "killed")
    result, _ = run_json(spec)
    assert server.process.wait(10) == 70  # the server really died in the middle of the request
    ask = result["steps"][0]
    assert ask["output"]["source"] == "heuristic"
    # the connection broke mid-answer (may heal: retried), then nothing listened (fall back at once)
    types = [e["error_type"] for e in ask["errors"]]
    assert types == ["BackendUnreachable", "ConnectionRefused"]


def test_slow_answers_get_a_longer_timeout_and_5xx_are_retried(
        prefect_api: str, tmp_path: Path, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    url = lmstudio_server_factory(models=SMOL_4096, delay_seconds=1.0).url
    flaky_url = lmstudio_server_factory(models=SMOL_4096, error_rate=0.5, error_status=503, error_seed=3).url
    # loaded before the run: the attempts measure the 1 s answers, not a load on a busy box
    loaded = httpx.post(f"{url}/api/v1/models/load", json={"model": "smollm2-135m-instruct"}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    spec = write_spec(tmp_path, f"""\
        servers:
          default: {{backend: local}}
          slow: {{backend: lmstudio, url: "{url}"}}
          flaky: {{backend: lmstudio, url: "{flaky_url}"}}
        models:
          slow: {{key: smollm2-135m-instruct, server: slow}}
          flaky: {{key: smollm2-135m-instruct, server: flaky}}
          missing: {{key: not-on-this-server, server: slow, fallback: [{{value: fallback}}]}}
        defaults: {{retries: 3, retry_delay: 0.1s, cache: false, max_parallel: 1}}
        steps:
          - id: slow
            prompt: {{model: slow, user: "Say hi.", max_tokens: 5}}
            timeout: 0.4s
            timeout_growth: 10
          - id: flaky
            prompt: {{model: flaky, user: "Say hi.", max_tokens: 5}}
          - id: missing
            prompt: {{model: missing, user: "Say hi.", max_tokens: 5}}
        """, "slow")
    result, _ = run_json(spec)
    steps = {s["id"]: s for s in result["steps"]}
    # attempt 1 timed out at 0.4 s; attempt 2 had 4 s for the 1 s answer and got it
    slow = steps["slow"]
    assert [(e["error_type"], e["attempt"]) for e in slow["errors"]] == [("BackendTimeout", 1)]
    assert slow["answered_by"]["link"] == 0 and slow["meta"]["attempts"] == 2
    # 503s are retried until one gets through (seeded: the same requests fail every time)
    flaky = steps["flaky"]
    assert flaky["answered_by"]["link"] == 0
    assert flaky["errors"] and {e["error_type"] for e in flaky["errors"]} == {"BackendHTTPError"}
    assert flaky["meta"]["attempts"] == len(flaky["errors"]) + 1
    # a 404 will fail again: no retry, straight to the fallback
    missing = steps["missing"]["errors"]
    assert [(e["error_type"], e["attempt"]) for e in missing] == [("ModelNotFound", 1)]
    assert steps["missing"]["output"] == "fallback"


def test_context_overflow_moves_to_a_larger_context(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        models:
          tiny: {key: smollm2-135m-instruct, context_length: 256, fallback: [also_tiny, roomy]}
          also_tiny: {key: smollm2-135m-instruct, context_length: 256}
          roomy: {key: smollm2-135m-instruct, context_length: 2048}
        defaults: {retries: 2, retry_delay: 0.1s, cache: false}
        params: {text: ""}
        steps:
          - id: long
            prompt: {model: tiny, user: "${{ params.text }} Summarise.", max_tokens: 5}
        """, "overflow")
    result, _ = run_json(spec, "-p", "text=" + "word " * 400)
    meta = result["steps"][0]
    assert meta["answered_by"] == {"link": 2, "target": "model roomy"}
    first, skipped = meta["errors"]
    assert first["error_type"] == "ContextOverflow" and first["attempt"] == 1  # not retried
    assert "the loaded context holds 256" in first["message"]
    assert skipped["error_type"] == "ContextOverflow" and skipped["attempt"] is None
    assert skipped["message"].startswith("holds 256 tokens, the prompt needs 4")


def test_the_response_cache_hits_groups_similar_inputs_and_survives_corruption(
        prefect_api: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "answers"
    spec = write_spec(tmp_path, """\
        models: {smol: {key: smollm2-135m-instruct, context_length: 1024}}
        defaults: {cache: false, max_parallel: 1}
        response_cache: {ttl: 1h, size_limit: 50MB, dir: answers}
        steps:
          - id: one
            prompt: {model: smol, user: "Say one word.", max_tokens: 5, seed: 1}
          - id: similar
            prompt: {model: smol, user: "Say two words.", max_tokens: 5,
                      response_cache: {key: "fallbacks:bucket"}}
          - id: alike
            prompt: {model: smol, user: "Say three words.", max_tokens: 5,
                      response_cache: {key: "fallbacks:bucket"}}
          - id: never
            prompt: {model: smol, user: "Say one word.", max_tokens: 5, seed: 1, response_cache: false}
        """, "cached")
    first, _ = run_json(spec)
    caches = [s["meta"].get("cache") for s in first["steps"]]
    assert caches == ["miss", "miss", "hit", None]  # "alike" shares "similar"'s bucket ("say")
    assert first["steps"][2]["output"] == first["steps"][1]["output"]
    assert first["stats"]["response_cache"]["hits"] == 1

    second, _ = run_json(spec)
    assert [s["meta"].get("cache") for s in second["steps"]] == ["hit", "hit", "hit", None]
    assert second["steps"][0]["output"] == first["steps"][0]["output"]
    stats = lmflow_cmd("cache", "stats", "--spec", str(spec))
    assert stats.returncode == 0 and f"{cache_dir}: 2 answers" in stats.stdout

    # a corrupt cache is reported and bypassed: the run still answers
    (cache_dir / "cache.db").write_bytes(b"this is not a database" * 100)
    third = lmflow_cmd("run", str(spec), "--json")
    assert third.returncode == 0, third.stderr
    assert "warning: one: response cache at" in third.stderr and "running without it" in third.stderr
    result = json.loads(third.stdout)
    assert all(s["status"] == "completed" for s in result["steps"])
    assert result["stats"]["response_cache"]["errors"]
    unreadable = lmflow_cmd("cache", "stats", "--spec", str(spec))
    assert unreadable.returncode == 1 and "`lmflow cache clear` removes it" in unreadable.stderr
    assert "Traceback" not in unreadable.stderr
    cleared = lmflow_cmd("cache", "clear", "--spec", str(spec))
    assert cleared.returncode == 0
    assert lmflow_cmd("cache", "stats", "--spec", str(spec)).stdout.startswith(f"{cache_dir}: 0 answers")


def test_a_cache_folder_that_is_a_file_is_bypassed(prefect_api: str, tmp_path: Path) -> None:
    (tmp_path / "answers").write_text("not a folder")
    spec = write_spec(tmp_path, """\
        models: {smol: {key: smollm2-135m-instruct, context_length: 1024}}
        response_cache: {dir: answers}
        steps:
          - id: one
            prompt: {model: smol, user: "Say one word.", max_tokens: 5}
        """, "cache-file")
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 0, out.stderr
    assert "could not open" in out.stderr and "response cache: 0 hits, 0 misses, unusable" in out.stdout


@pytest.mark.parametrize("action", ["fallback", "wait", "fail"])
def test_the_resource_guard_routes_waits_or_fails(prefect_api: str, tmp_path: Path, action: str) -> None:
    spec = write_spec(tmp_path, f"""\
        models:
          big: {{key: smollm2-135m-instruct, context_length: 2048, fallback: [small]}}
          small: {{key: smollm2-135m-instruct, context_length: 512}}
        guard: {{min_free_memory: 100TB, action: {action}, wait: 0.5s}}
        defaults: {{cache: false}}
        steps:
          - id: ask
            prompt: {{model: big, user: "Say hi.", max_tokens: 5}}
        """, f"guard-{action}")
    out = lmflow_cmd("run", str(spec), "--json")
    if action == "fail":
        assert out.returncode == 1
        assert "resource guard: free memory" in out.stderr.splitlines()[-1]
        assert "below guard.min_free_memory 93132.3 GiB" in out.stderr.splitlines()[-1]
        return
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout)["steps"][0]
    assert meta["answered_by"] == {"link": 1, "target": "model small"}  # the smaller model answered
    (decision,) = meta["errors"]
    assert decision["error_type"] == "ResourceGuard"
    expected = "waited 0.5s, still free memory" if action == "wait" else "free memory"
    assert decision["message"].startswith(expected)


def test_an_answer_from_a_fallback_is_not_reused_by_the_next_run(prefect_api: str, tmp_path: Path) -> None:
    port = free_port()
    spec = write_spec(tmp_path, f"""\
        servers:
          default: {{backend: local}}
          down: {{backend: openai, url: "http://127.0.0.1:{port}"}}
        models:
          big: {{key: some-big-model, server: down, fallback: [{{value: later}}]}}
        steps:
          - id: ask
            prompt: {{model: big, user: "Say hi."}}
          - id: plain
            python: {{function: "fallbacks:bucket", args: {{request: {{messages: [{{content: Hello}}]}}}}}}
        """, "degraded")
    first, _ = run_json(spec)
    second, _ = run_json(spec)
    assert [s["status"] for s in first["steps"]] == ["completed", "completed"]
    # the step cache keeps the plain step, but asks the model again instead of reusing "later"
    assert [s["status"] for s in second["steps"]] == ["completed", "cached"]
    assert second["steps"][0]["answered_by"]["link"] == 1


def test_the_coach_spec_answers_from_lm_studio_else_locally_and_caches(prefect_api: str, lmstudio: str,
                                                                        tmp_path: Path) -> None:
    from conftest import ROOT

    spec = ROOT / "specs" / "coach-with-fallbacks.yaml"
    state = "state=best fitness 0.41, diversity 0.31"  # the cache lives in this test session's home
    try:
        up, _ = run_json(spec, "-p", f"lmstudio_url={lmstudio}", "-p", state)
    finally:  # LM Studio keeps a just-in-time load; later tests of this session expect nothing loaded
        lmflow_cmd("models", "unload", "--all", "--server", lmstudio)
    advice = up["steps"][0]
    assert advice["answered_by"] == {"link": 0, "target": "model coach"}, advice["errors"]
    assert advice["output"]["mutation"] in ("raise", "lower", "keep")
    again, _ = run_json(spec, "-p", f"lmstudio_url={lmstudio}", "-p", state)
    assert again["steps"][0]["meta"]["cache"] == "hit"
    assert again["steps"][0]["output"] == advice["output"]

    down, _ = run_json(spec, "-p", f"lmstudio_url=http://127.0.0.1:{free_port()}", "-p", state)
    local = down["steps"][0]
    errors = local["errors"]
    assert errors[0]["error_type"] == "ConnectionRefused"  # LM Studio is down: straight to the next link
    # the local model answers, or (a 135M model may ramble past max_tokens) the heuristic does
    assert local["answered_by"]["link"] == 1 or errors[1]["error_type"] == "InvalidResponse"
    assert set(local["output"]) == {"mutation", "advice"}


def test_an_open_breaker_fails_a_model_without_fallback_at_once(prefect_api: str, tmp_path: Path) -> None:
    port = free_port()
    spec = write_spec(tmp_path, f"""\
        servers:
          default: {{backend: local}}
          down: {{backend: openai, url: "http://127.0.0.1:{port}"}}
        models:
          big: {{key: some-big-model, server: down}}
        breaker: {{failures: 1, cooldown: 10m}}
        defaults: {{max_parallel: 1}}
        steps:
          - id: first
            prompt: {{model: big, user: "Say hi.", fallback: [{{value: later}}]}}
          - id: alone
            prompt: {{model: big, user: "Say hi again."}}
        """, "open-alone")
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 1
    last = out.stderr.splitlines()[-1]
    assert last.startswith("error: step 'alone' failed: model big: circuit open after 1 consecutive "
                           "failures; skipped for ")
    assert last.endswith("s more (breaker.cooldown) (declare a fallback to answer anyway)")
