"""Loop steps end to end: real `lmflow run` processes, a real Prefect server, real engines, real kills."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import BIN, MODELS, ROOT, lmflow_cmd, wait_for

from lmflow.testing.pytest_plugin import RunningServer

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

GA = ROOT / "examples" / "coach" / "ga.py"

HELPERS = """\
import json
import os
import time

import ga

SLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow.flag")


def slow_generation(state, generation):
    if os.path.exists(SLOW):
        time.sleep(0.05)
    return ga.one_generation(state, generation)


def coach(generation, log, slow_at=None):
    with open(log, "a") as f:
        f.write(json.dumps(generation) + "\\n")
    if generation == slow_at and os.path.exists(SLOW):
        time.sleep(120)  # killed here
    return ga.scripted_advice(generation)


def counter():
    return {"rate": -1.0}


def count(state, generation):
    time.sleep(0.1)
    return {"rate": state["rate"]}  # the rate this generation ran with


def tagged(tag, generation):
    return {"tag": tag, "generation": generation}
"""

def write_spec(folder: Path, body: str, name: str) -> Path:
    shutil.copy(GA, folder / "ga.py")
    (folder / "loophelp.py").write_text(HELPERS)
    path = folder / f"{name}.yaml"
    path.write_text(f"version: 1\nname: {name}\n" + textwrap.dedent(body))
    return path


def run_json(spec: Path, *args: str) -> dict:
    out = lmflow_cmd("run", str(spec), "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def scripted_spec(tmp_path: Path, log: Path, name: str, generations: int = 20, slow_at: str = "null") -> Path:
    return write_spec(tmp_path, f"""\
        params: {{generations: {generations}}}
        steps:
          - id: evolve
            loop:
              generations: ${{{{ params.generations }}}}
              init: {{function: ga:init, args: {{seed: 11}}}}
              body: loophelp:slow_generation
              checkpoints:
                - at: [3]
                  every: 5
                  steps:
                    - id: advise
                      python:
                        function: loophelp:coach
                        args: {{generation: "${{{{ loop.generation }}}}", log: "{log}", slow_at: {slow_at}}}
                  apply:
                    mutation_rate: {{min: 0.001, max: 0.5}}
                    sigma: {{min: 0.01, max: 2}}
                    crossover: {{enum: [uniform, blend, one_point]}}
        """, name)


def replay(generations: int, due: list[int]) -> dict:
    """The same optimiser with the same advice, applied by hand at the same generations."""
    import importlib.util

    from lmflow.steps.loop.apply import apply_fields
    from lmflow.steps.loop.runner import state_view
    from lmflow.steps.loop.spec import ApplyField

    spec = importlib.util.spec_from_file_location("ga_replay", GA)
    ga = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ga)
    fields = (ApplyField("mutation_rate", "mutation_rate", 0.001, 0.5),
              ApplyField("sigma", "sigma", 0.01, 2), ApplyField("crossover", "crossover",
                                                                enum=("uniform", "blend", "one_point")))
    state = ga.init(seed=11)
    for g in range(1, generations + 1):
        ga.one_generation(state, g)
        if g in due:
            apply_fields(state, ga.scripted_advice(g), fields)
    return json.loads(json.dumps(state_view(state)))


def test_checkpoints_run_at_their_generations_and_bad_advice_is_recorded_not_applied(
        prefect_api: str, tmp_path: Path) -> None:
    log = tmp_path / "coach.log"
    spec = scripted_spec(tmp_path, log, "scripted")
    result = run_json(spec)
    loop = result["steps"][0]["output"]
    analyses = loop["analyses"]
    assert [a["asked_at"] for a in analyses] == [3, 5, 10, 15, 20]
    assert all(a["applied_at"] == a["asked_at"] for a in analyses)  # blocking: applied at once
    assert [json.loads(x) for x in log.read_text().split()] == [3, 5, 10, 15, 20]
    at5 = {c["field"]: c for c in analyses[1]["changes"]}
    assert at5["crossover"]["status"] == "normalised" and at5["crossover"]["value"] == "blend"
    assert at5["crossover"]["raw"] == "BLEND"
    at10 = {c["field"]: c for c in analyses[2]["changes"]}
    assert at10["mutation_rate"] == {"field": "mutation_rate", "raw": 7.5, "status": "clamped",
                                     "note": "7.5 is above max 0.5: clamped", "previous": 0.2, "value": 0.5}
    assert at10["sigma"]["status"] == "rejected" and at10["sigma"]["raw"] == "wide"
    assert at10["crossover"]["status"] == "rejected" and "zigzag" in at10["crossover"]["note"]
    # the advice changed the run exactly where the record says: the same as applying it by hand
    assert loop["state"] == replay(20, [3, 5, 10, 15, 20])
    assert [h["generation"] for h in loop["history"]] == list(range(1, 21))
    assert loop["stopped"] == "generations" and loop["resumed_from"] is None
    # in Prefect: each analysis step is a task run of its own, and the loop has a report
    flow_run = result["flow_run_id"]
    expected = sorted(["evolve", *(f"evolve@{g}.advise" for g in (3, 5, 10, 15, 20))])
    runs = wait_for(lambda: (r := httpx.post(f"{prefect_api}/task_runs/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": [flow_run]}}}).json()) and len(r) == len(expected) and r, timeout=60)
    assert runs and sorted(r["name"] for r in runs) == expected
    artifacts = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30, json={
        "artifacts": {"flow_run_id": {"any_": [flow_run]}, "key": {"any_": ["evolve"]}},
        "sort": "CREATED_DESC"}).json()
    assert artifacts and "data:image/svg+xml;base64," in artifacts[0]["data"]
    assert "| 10 | 10 | blocking | applied |" in artifacts[0]["data"]


def test_a_param_used_only_inside_a_checkpoint_changes_the_loops_cache_key(
        prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        params: {tag: ALPHA}
        steps:
          - id: evolve
            loop:
              generations: 2
              init: loophelp:counter
              body: loophelp:count
              checkpoints:
                - at: [2]
                  steps:
                    - id: advise
                      python:
                        function: loophelp:tagged
                        args: {tag: "${{ params.tag }}", generation: "${{ loop.generation }}"}
    """, name="tagged")

    def asked(*args: str) -> tuple[str, str]:
        step = run_json(spec, *args)["steps"][0]
        return step["status"], step["output"]["analyses"][0]["advice"]["tag"]

    assert asked("-p", "tag=ALPHA") == ("completed", "ALPHA")
    assert asked("-p", "tag=ALPHA") == ("cached", "ALPHA")  # the same loop: its cached answer
    assert asked("-p", "tag=BETA") == ("completed", "BETA")  # not ALPHA's answer served as BETA's


def test_a_killed_loop_resumes_asks_the_interrupted_analysis_again_and_ends_in_the_same_state(
        prefect_api: str, tmp_path: Path) -> None:
    log = tmp_path / "coach.log"
    spec = scripted_spec(tmp_path, log, "resume", generations=25, slow_at="10")
    (tmp_path / "slow.flag").touch()  # generations take 50 ms; the coach hangs at generation 10
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        assert wait_for(lambda: log.exists() and "10" in log.read_text().split(), timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (tmp_path / "slow.flag").unlink()
    saved = list((Path(os.environ["LMFLOW_HOME"]) / "loops").glob("*.state"))
    assert len(saved) == 1

    resumed = run_json(spec)["steps"][0]
    loop = resumed["output"]
    assert loop["resumed_from"] == 10
    assert [h["generation"] for h in loop["history"]] == list(range(1, 26))
    asked = [a["asked_at"] for a in loop["analyses"]]
    assert asked == [3, 5, 10, 15, 20, 25]  # 10 once: asked again after the kill, applied once
    assert loop["analyses"][2].get("reasked") is True
    assert [json.loads(x) for x in log.read_text().split()] == [3, 5, 10, 10, 15, 20, 25]
    assert not saved[0].exists()  # a finished loop removes its saved state
    # the same final state as an uninterrupted run with the same seed
    fresh = run_json(spec, "--refresh")["steps"][0]["output"]
    assert fresh["resumed_from"] is None
    assert loop["state"] == fresh["state"] == replay(25, [3, 5, 10, 15, 20, 25])
    assert loop["history"] == fresh["history"]


def test_background_advice_is_applied_at_the_first_generation_after_it_arrives(
        prefect_api: str, tmp_path: Path, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    # a slow coach on the LM Studio test server: 1.5 s per answer, 0.1 s per generation
    url = lmstudio_server_factory(models=[{"key": "smollm2-135m-instruct", "max_context_length": 4096}],
                                  delay_seconds=1.5).url
    spec = write_spec(tmp_path, f"""\
        server: {{backend: lmstudio, url: "{url}"}}
        models: {{coach: {{key: smollm2-135m-instruct, context_length: 1024}}}}
        defaults: {{cache: false}}
        steps:
          - id: evolve
            loop:
              generations: 80
              init: loophelp:counter
              body: loophelp:count
              checkpoints:
                - every: 4
                  mode: background
                  steps:
                    - id: advise
                      prompt:
                        model: coach
                        user: "The rate is ${{{{ loop.state.rate }}}}. Give a new rate between 0 and 1."
                        response_schema: {{type: object, required: [rate], additionalProperties: false,
                                           properties: {{rate: {{type: number}}}}}}
                        temperature: 0
                        max_tokens: 40
                  apply: {{rate: {{min: 0, max: 1}}}}
        """, "background")
    loop = run_json(spec)["steps"][0]["output"]
    analyses = loop["analyses"]
    first = analyses[0]  # in the order asked
    assert first["asked_at"] == 4 and first["status"] == "applied"
    assert first["applied_at"] > 4 + 5, first  # 1.5 s of coach: at least ~10 generations later
    # the state changed exactly at that boundary: generations up to it ran with the old rate
    rates = [h["rate"] for h in loop["history"]]
    assert rates[: first["applied_at"]] == [-1.0] * first["applied_at"]
    assert 0 <= rates[first["applied_at"]] <= 1
    # asks that came while one was in flight were skipped, and said so
    skipped = [a for a in analyses if a["status"] == "skipped"]
    assert skipped and all("still running" in a["error"] for a in skipped)
    assert all(a["applied_at"] is None or a["applied_at"] > a["asked_at"] for a in analyses)


@pytest.mark.engine
def test_reload_between_analyses_goes_through_one_sdk_client(
        prefect_api: str, tmp_path: Path, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    url = lmstudio_server_factory(models=MODELS).url
    spec = write_spec(tmp_path, f"""\
        server: {{backend: lmstudio, url: "{url}"}}
        models:
          coach: {{key: smollm2-135m-instruct, context_length: 1024, ttl: 600}}   # ttl: loads use the SDK
        defaults: {{cache: false}}
        steps:
          - id: load
            load_model: {{model: coach}}
          - id: evolve
            loop:
              generations: 6
              init: {{function: ga:init, args: {{seed: 3}}}}
              body: ga:one_generation
              checkpoints:
                - every: 2
                  steps:
                    - id: fresh
                      reload_model: {{model: coach}}
                    - id: advise
                      prompt:
                        model: coach
                        user: "Best ${{{{ loop.stats.best }}}}. Say ok."
                        max_tokens: 3
        """, "reload")
    result = run_json(spec)
    stats = httpx.get(f"{url}/lmflow/stats").json()
    loaded = httpx.get(f"{url}/api/v1/models").json()
    loop = result["steps"][1]["output"]
    assert [a["asked_at"] for a in loop["analyses"]] == [2, 4, 6]
    assert all(a["steps"]["fresh"]["status"] == "completed" for a in loop["analyses"])
    assert all(a["status"] == "recorded" and a["advice"] for a in loop["analyses"])
    assert stats["sdk_clients"] == 1  # four loads, one client
    assert stats["chat_requests"] == 3
    assert all(not m.get("loaded_instances") for m in loaded.get("models", loaded.get("data", [])))


@pytest.mark.engine
def test_the_coach_example_runs_as_the_readme_says(prefect_api: str) -> None:
    # the command in the README, as quoted there (with --json to read the result)
    out = lmflow_cmd("run", "examples/coach/coach.yaml", "-p", "generations=10", "--json", "--refresh")
    assert out.returncode == 0, out.stderr
    evolve, summary = json.loads(out.stdout)["steps"]
    analyses = evolve["output"]["analyses"]
    assert [a["asked_at"] for a in analyses] == [5, 10]
    for a in analyses:
        assert a["steps"]["fresh"]["status"] == "completed"
        assert a["steps"]["advise"]["answered_by"]["target"] in ("model coach", "python ga:heuristic_advice")
        assert a["status"] in ("applied", "rejected")
    assert summary["output"]["generations"] == 10
    assert summary["output"]["best"] == evolve["output"]["state"]["best"]


@pytest.mark.engine
def test_the_evolution_coach_spec_on_the_test_server(
        prefect_api: str, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    url = lmstudio_server_factory(models=MODELS, delay_seconds=0.3).url
    # the command in the spec's comment, as quoted there
    out = lmflow_cmd("run", "specs/evolution-coach.yaml", "-p", f"lmstudio_url={url}",
                     "-p", "generations=15", "--json")
    loaded = httpx.get(f"{url}/api/v1/models").json()
    assert out.returncode == 0, out.stderr
    probe, evolve, done = json.loads(out.stdout)["steps"]
    assert probe["output"]["loadable_max"] == 3072
    analyses = evolve["output"]["analyses"]
    assert analyses and analyses[0]["asked_at"] == 5 and analyses[0]["mode"] == "background"
    assert all(a["status"] in ("applied", "skipped", "late", "rejected") for a in analyses), analyses
    assert done["status"] == "completed"
    assert all(not m.get("loaded_instances") for m in loaded.get("models", loaded.get("data", [])))
