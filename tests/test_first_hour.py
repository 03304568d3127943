"""What a new user hits in the first hour: implicit loads at the declared size, leftovers of a
killed run, `lmflow models unload`, templated file paths, the working directory, typed params.

Runs are real `lmflow` processes against the LM Studio-compatible test server (real inference)
and a real Prefect server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import BIN, lmflow_cmd, lmflow_in_process, wait_for

from lmflow.errors import SpecError
from lmflow.spec import load_spec
from lmflow.testing.pytest_plugin import RunningServer


def loaded(url: str) -> list[tuple[str, str, int]]:
    models = httpx.get(f"{url}/api/v1/models").json()["models"]
    return [(m["key"], i["id"], i["config"]["context_length"])
            for m in models for i in m["loaded_instances"]]


HELPERS = """\
import json
import os
import time
import urllib.request


def loaded(url):
    with urllib.request.urlopen(url + "/api/v1/models") as answer:
        models = json.load(answer)["models"]
    return [[m["key"], i["config"]["context_length"]] for m in models for i in m["loaded_instances"]]


def nap(seconds):
    time.sleep(seconds)
    return seconds


def wait_for_file(path):
    deadline = time.time() + 120
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.05)
    return os.path.exists(path)
"""


def write_spec(tmp: Path, url: str, model: str, steps: str, params: str = "{}") -> Path:
    (tmp / "helpers.py").write_text(HELPERS)
    path = tmp / "first.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        name: first-hour
        params: {params}
        server: {{backend: lmstudio, url: "{url}"}}
        models:
          smol: {model}
        defaults: {{cache: false}}
        steps:
        """) + textwrap.indent(textwrap.dedent(steps), "  "))
    return path


ASK_THEN_LOOK = """\
- id: ask
  prompt: {model: smol, user: "Say hi.", max_tokens: 4}
- id: look
  after: [ask]
  python: {function: "helpers:loaded", args: {url: "%s"}}
"""


@pytest.mark.engine
def test_a_declared_context_is_loaded_on_first_use_and_unloaded_at_the_end(
        lmstudio: str, prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, lmstudio, "{key: smollm2-135m-instruct, context_length: 1536}",
                      ASK_THEN_LOOK % lmstudio)
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    steps = {s["id"]: s for s in json.loads(out.stdout)["steps"]}
    # without lmflow's load the server would have loaded it at its own default (3072)
    assert steps["look"]["output"] == [["smollm2-135m-instruct", 1536]]
    assert loaded(lmstudio) == []


@pytest.mark.engine
def test_a_clamped_first_use_load_is_reported(lmstudio: str, prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, lmstudio, "{key: smollm2-135m-instruct, context_length: 6000}",
                      ASK_THEN_LOOK % lmstudio)
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {s["id"]: s["output"] for s in result["steps"]}["look"] == [["smollm2-135m-instruct", 3072]]
    assert any("with context 3072, not the 6000 that models.smol.context_length declares"
               in e.get("message", "") for e in result["events"]), result["events"]
    assert loaded(lmstudio) == []


@pytest.mark.engine
def test_an_instance_already_loaded_as_declared_is_used_and_left_alone(
        lmstudio: str, prefect_api: str, tmp_path: Path) -> None:
    httpx.post(f"{lmstudio}/api/v1/models/load", timeout=120,
               json={"model": "smollm2-135m-instruct", "context_length": 1536}).raise_for_status()
    try:
        spec = write_spec(tmp_path, lmstudio, "{key: smollm2-135m-instruct, context_length: 1536}",
                          ASK_THEN_LOOK % lmstudio)
        out = lmflow_cmd("run", str(spec), "--json")
        assert out.returncode == 0, out.stderr
        look = {s["id"]: s["output"] for s in json.loads(out.stdout)["steps"]}["look"]
        assert look == [["smollm2-135m-instruct", 1536]]  # no second instance
        assert [(k, c) for k, _i, c in loaded(lmstudio)] == [("smollm2-135m-instruct", 1536)]
    finally:
        assert lmflow_cmd("models", "unload", "--all", "--server", lmstudio).returncode == 0
    assert loaded(lmstudio) == []


KILLED = """\
- id: ask
  prompt: {model: smol, user: "Say hi.", max_tokens: 4}
- id: wait
  after: [ask]
  python: {function: "helpers:nap", args: {seconds: "${{ params.nap }}"}}
"""


def journals(name: str) -> set[Path]:
    return set((Path(os.environ["LMFLOW_HOME"]) / "runs").glob(f"{name}-*.jsonl"))


def journaled(name: str, text: str, earlier: set[Path]) -> bool:
    """Whether a journal of a run of `name` newer than the `earlier` ones holds `text`."""
    return any(text in path.read_text() for path in journals(name) - earlier)


def kill_when(spec: Path, ready: Callable[[], object]) -> None:
    """Start `lmflow run` on the spec and SIGKILL its process group once `ready()` is true."""
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec), "-p", "nap=120"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
                            start_new_session=True)
    try:
        assert wait_for(ready, timeout=120), "the run never got that far"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def assert_next_run_unloads(spec: Path, url: str) -> list[str]:
    """The next run unloads what the killed one left; returns that run's warnings."""
    out = lmflow_cmd("run", str(spec), "-p", "nap=0.1", "--json")
    assert out.returncode == 0, out.stderr
    events = json.loads(out.stdout)["events"]
    assert any("left loaded by the killed run first-hour-" in e.get("message", "") for e in events), events
    assert loaded(url) == []
    again = lmflow_cmd("run", str(spec), "-p", "nap=0", "--json")  # handled once, not again
    assert again.returncode == 0, again.stderr
    assert not any("killed run" in e.get("message", "") for e in json.loads(again.stdout)["events"])
    return [e["message"] for e in events if e.get("event") == "warning"]


@pytest.mark.engine
def test_the_next_run_unloads_what_a_killed_run_loaded(lmstudio: str, prefect_api: str,
                                                       tmp_path: Path) -> None:
    spec = write_spec(tmp_path, lmstudio, "{key: smollm2-135m-instruct, context_length: 1536}", KILLED,
                      params="{nap: {type: number, default: 0}}")
    earlier = journals("first-hour")
    kill_when(spec, lambda: journaled("first-hour", '"loaded": "smol"', earlier))
    assert [(k, c) for k, _i, c in loaded(lmstudio)] == [("smollm2-135m-instruct", 1536)]  # left behind
    # damaged lines in the killed run's journal (a disk error, a hand edit) cost a warning, not the run
    (journal,) = journals("first-hour") - earlier
    text = journal.read_bytes()
    journal.write_bytes(text + (b"" if text.endswith(b"\n") else b"\n") + b'42\n\xff\xfe{"x": 1}\n')
    lines = text.count(b"\n") + (0 if text.endswith(b"\n") else 1)
    warnings = assert_next_run_unloads(spec, lmstudio)
    assert f"{journal}:{lines + 1}: skipped a line that lmflow cannot read (a JSON int, not an object)" \
        in warnings, warnings
    assert f"{journal}:{lines + 2}: skipped a line that lmflow cannot read (not UTF-8 at byte 0)" \
        in warnings, warnings


@pytest.mark.engine
def test_the_next_run_unloads_what_a_run_killed_mid_load_loaded(
        prefect_api: str, tmp_path: Path, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    # the server lists an instance 8 s before it answers its load: the kill falls in between
    url = lmstudio_server_factory(models=[{"key": "smollm2-135m-instruct"}], load_answer_delay_seconds=8).url
    httpx.post(f"{url}/api/v1/models/load", timeout=120,  # someone else's: never unloaded
               json={"model": "smollm2-135m-instruct", "context_length": 1024}).raise_for_status()
    spec = write_spec(tmp_path, url, "{key: smollm2-135m-instruct, context_length: 1536}", KILLED,
                      params="{nap: {type: number, default: 0}}")
    earlier = journals("first-hour")
    kill_when(spec, lambda: len(loaded(url)) == 2)
    assert not journaled("first-hour", '"loaded": "smol"', earlier)  # the run never heard back
    assert sorted(c for _k, _i, c in loaded(url)) == [1024, 1536]
    out = lmflow_cmd("run", str(spec), "-p", "nap=0", "--json", timeout=300)
    assert out.returncode == 0, out.stderr
    events = json.loads(out.stdout)["events"]
    assert any("(instance smollm2-135m-instruct:2), left loaded by the killed run first-hour-"
               in e.get("message", "") for e in events), events
    assert [(i, c) for _k, i, c in loaded(url)] == [("smollm2-135m-instruct", 1024)]


SHARED = """\
- id: ask
  prompt: {model: smol, user: "Say hi.", max_tokens: 4}
- id: hold
  after: [ask]
  python: {function: "helpers:wait_for_file", args: {path: "${{ params.flag }}"}}
"""


@pytest.mark.engine
def test_a_run_does_not_unload_an_instance_another_run_still_uses(
        lmstudio: str, prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, lmstudio, "{key: smollm2-135m-instruct, context_length: 1536}", SHARED,
                      params="{flag: {type: string, default: none}}")
    journals_before = journals("first-hour")

    def start(flag: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "lmflow"), "run", str(spec), "-p", f"flag={tmp_path / flag}",
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=os.environ.copy())

    def holding(count: int) -> bool:  # `count` runs have asked the model and wait for their flag
        return sum('{"step": "hold", "status": "running"}' in p.read_text()
                   for p in journals("first-hour") - journals_before) == count

    first = start("first-go")
    second = None
    try:
        assert wait_for(lambda: holding(1), timeout=120)
        second = start("second-go")  # finds the instance the first run loaded, and uses it
        assert wait_for(lambda: holding(2), timeout=120)
        assert [(k, c) for k, _i, c in loaded(lmstudio)] == [("smollm2-135m-instruct", 1536)]
        (tmp_path / "first-go").touch()
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 0
        events = json.loads(out)["events"]
        assert any("left 'smollm2-135m-instruct' loaded (instance" in e.get("message", "")
                   and "another lmflow run on this machine uses it" in e["message"] for e in events), events
        assert [(k, c) for k, _i, c in loaded(lmstudio)] == [("smollm2-135m-instruct", 1536)]  # still there
        (tmp_path / "second-go").touch()
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        assert loaded(lmstudio) == []  # the last run to use it unloaded it
        assert any("which the run first-hour-" in e.get("message", "") and "left to the last run using it"
                   in e["message"] for e in json.loads(out)["events"])
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
        if loaded(lmstudio):
            lmflow_cmd("models", "unload", "--all", "--server", lmstudio)


@pytest.mark.engine
def test_models_unload_by_key_and_all(lmstudio: str) -> None:
    for size in (1024, 1536):
        httpx.post(f"{lmstudio}/api/v1/models/load", timeout=120,
                   json={"model": "smollm2-135m-instruct", "context_length": size}).raise_for_status()
    httpx.post(f"{lmstudio}/api/v1/models/load", timeout=120,
               json={"model": "small-strict", "context_length": 1024}).raise_for_status()
    try:
        out = lmflow_in_process("models", "unload", "smollm2-135m-instruct", "--server", lmstudio)
        assert out.exit_code == 0, out.stderr
        assert out.stdout.count("unloaded smollm2-135m-instruct") == 2
        assert [k for k, _i, _c in loaded(lmstudio)] == ["small-strict"]
        none = lmflow_in_process("models", "unload", "smollm2-135m-instruct", "--server", lmstudio)
        assert none.exit_code == 0, none.stderr
        assert f"nothing to unload: {lmstudio} has no 'smollm2-135m-instruct' loaded" in none.stdout
        bad = lmflow_in_process("models", "unload", "--server", lmstudio)
        assert bad.exit_code == 2 and "give a model KEY or --all" in bad.stderr
    finally:
        everything = lmflow_in_process("models", "unload", "--all", "--server", lmstudio)
    assert everything.exit_code == 0, everything.stderr
    assert "unloaded small-strict" in everything.stdout
    assert loaded(lmstudio) == []


# ---------------------------------------------------------------- paths

def test_a_templated_prompt_file_passes_validation_and_is_read_when_the_step_runs(
        engine: object, prefect_api: str, tmp_path: Path) -> None:
    folder = tmp_path / "spec"
    (folder / "tickets").mkdir(parents=True)
    (folder / "tickets" / "a.txt").write_text("Reply with the word: pineapple ${{ not a template }}")
    spec = folder / "tickets.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: tickets
        params: {ticket: tickets/a.txt}
        server: {backend: local}
        models:
          smol: {key: smollm2-135m-instruct, context_length: 1024}
        steps:
          - id: read
            prompt: {model: smol, user: {file: "${{ params.ticket }}"}, max_tokens: 4, temperature: 0}
        """))
    assert lmflow_cmd("validate", str(spec)).returncode == 0
    out = lmflow_cmd("run", str(spec), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    missing = lmflow_cmd("run", str(spec), "-p", "ticket=tickets/nope.txt", cwd=tmp_path)
    assert missing.returncode == 1
    assert "cannot read tickets/nope.txt" in missing.stderr
    assert "paths are relative to the spec's folder" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_python_steps_run_in_the_specs_folder(prefect_api: str, tmp_path: Path) -> None:
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "data.txt").write_text("forty-two")
    (folder / "io_helpers.py").write_text(textwrap.dedent("""\
        def copy(name):
            text = open("data.txt").read()
            with open(name, "w") as out:
                out.write(text.upper())
            return text
        """))
    spec = folder / "io.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: io
        defaults: {cache: false}
        steps:
          - id: copy
            python: {function: "io_helpers:copy", args: {name: out.txt}}
        """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = lmflow_cmd("run", str(spec), "--json", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["steps"][0]["output"] == "forty-two"
    assert (folder / "out.txt").read_text() == "FORTY-TWO"
    assert not (elsewhere / "out.txt").exists()


def test_the_working_directory_is_restored_after_a_run_in_process(
        prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmflow import run
    from lmflow.prefect import server as prefect_server

    # a run in this process sets Prefect's environment: undone afterwards, so that later tests'
    # `lmflow` processes choose their API themselves
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setattr(prefect_server, "_configured", None)

    (tmp_path / "cwd_helpers.py").write_text("import os\n\ndef where():\n    return os.getcwd()\n")
    spec = tmp_path / "cwd.yaml"
    spec.write_text("version: 1\nname: cwd\ndefaults: {cache: false}\n"
                    "steps:\n  - id: where\n    python: {function: 'cwd_helpers:where'}\n")
    before = os.getcwd()
    result = run(spec)
    assert result.ok, result.failure or result.error
    assert result.steps[0].output == str(tmp_path.resolve())
    assert os.getcwd() == before


# ---------------------------------------------------------------- params

def params_spec(tmp: Path, params: str) -> Path:
    path = tmp / "params.yaml"
    path.write_text(f"version: 1\nname: params\nparams: {params}\n"
                    "steps:\n  - id: s\n    python: {function: 'json:dumps', args: {obj: 1}}\n")
    return path


@pytest.mark.parametrize(("params", "given", "value"), [
    ("{sleep: {type: number, default: 0}}", {"sleep": "1.5"}, 1.5),
    ("{sleep: {type: number, default: 0}}", {"sleep": "2"}, 2),
    ("{sleep: {type: number, default: 0}}", {}, 0),
    ("{sleep: 0}", {"sleep": "3"}, 3),
    ("{name: {type: string}}", {"name": "007"}, "007"),
    ("{mode: {type: string, enum: [fast, slow], default: fast}}", {"mode": "slow"}, "slow"),
    ("{n: {type: integer, minimum: 1, maximum: 9, default: 1}}", {"n": "9"}, 9),
    ("{opts: {a: 1}}", {}, {"a": 1}),  # a mapping default without `type` is the short form
    ("{files: {type: array, default: []}}", {"files": "[a, b]"}, ["a", "b"]),
])
def test_params_take_their_declared_or_inferred_type(tmp_path: Path, params: str, given: dict, value: object
                                                     ) -> None:
    spec = load_spec(params_spec(tmp_path, params), given)
    assert spec.params[next(iter(spec.params))] == value


@pytest.mark.parametrize(("params", "given", "message"), [
    ("{sleep: 0}", {"sleep": "1.5"},
     "-p sleep: expected integer, got number 1.5: the default 0 makes 'sleep' an integer; to accept "
     "decimals declare `params: {sleep: {type: number, default: 0}}`"),
    ("{n: {type: integer, default: 1}}", {"n": "1.5"}, "-p n: expected integer, got number 1.5"),
    ("{mode: {type: string, enum: [fast, slow], default: fast}}", {"mode": "warp"},
     "-p mode: 'warp' is not one of 'fast', 'slow'"),
    ("{n: {type: integer, minimum: 1, default: 1}}", {"n": "0"}, "-p n: 0 is below the minimum 1"),
    ("{n: {type: count, default: 1}}", {}, "params.n.type: unknown param type 'count'"),
    ("{n: {type: integer, default: one}}", {},
     "params.n.default: the default does not fit: expected integer, got string 'one'"),
    ("{flag: false}", {"flag": "maybe"}, "-p flag: expected boolean, got string 'maybe'"),
])
def test_bad_params_say_what_and_how(tmp_path: Path, params: str, given: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(params_spec(tmp_path, params), given)
    assert message in str(info.value)


def test_the_ui_of_a_server_on_another_port_talks_to_that_server(prefect_api: str) -> None:
    assert not prefect_api.startswith("http://127.0.0.1:4200")
    settings = httpx.get(prefect_api.removesuffix("/api") + "/ui-settings", timeout=10).json()
    assert settings["api_url"] == prefect_api


def test_plan_says_a_declared_context_is_loaded_at_first_use(tmp_path: Path) -> None:
    from lmflow.render.report import plan

    implicit = write_spec(tmp_path, "http://127.0.0.1:1", "{key: k, context_length: 1536}",
                          ASK_THEN_LOOK % "u")
    assert "model smol: k on default, context 1536 (loaded so at its first use)" in plan(load_spec(implicit))
    explicit = write_spec(tmp_path, "http://127.0.0.1:1", "{key: k, context_length: 1536}",
                          "- id: load\n  load_model: {model: smol}\n")
    assert "model smol: k on default, context 1536\n" in plan(load_spec(explicit)) + "\n"


# ---------------------------------------------------------------- another client's instances

@pytest.mark.engine
def test_unload_and_probes_leave_another_clients_instance_alone(lmstudio: str, prefect_api: str,
                                                                tmp_path: Path) -> None:
    theirs = httpx.post(f"{lmstudio}/api/v1/models/load", timeout=120, json={
        "model": "small-strict", "context_length": 1024}).json()["instance_id"]
    try:
        spec = write_spec(tmp_path, lmstudio, "{key: small-strict}", """\
            - id: ask
              prompt: {model: smol, user: "Say hi.", max_tokens: 4}
            - id: free
              after: [ask]
              unload_model: {model: smol}
            """)
        out = lmflow_cmd("run", str(spec), "--json")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert {s["id"]: s["output"] for s in result["steps"]}["free"] == {"model": "small-strict",
                                                                           "unloaded": []}
        assert any("nothing unloaded: this run has no instance of 'small-strict' (models.smol)"
                   in e.get("message", "") for e in result["events"]), result["events"]
        assert [i for _k, i, _c in loaded(lmstudio)] == [theirs]
        probe = lmflow_cmd("probe", "small-strict", "--server", lmstudio, "--fresh", "--load-only",
                           "--max", "3072")
        assert probe.returncode == 0, probe.stderr
        assert "loads at most 2048" in probe.stdout, probe.stdout
        assert [i for _k, i, _c in loaded(lmstudio)] == [theirs]  # its loads and unloads were its own

        every = write_spec(tmp_path, lmstudio, "{key: small-strict}", """\
            - id: free
              unload_model: {model: smol, all: true}
            """)
        out = lmflow_cmd("run", str(every), "--json")
        assert out.returncode == 0, out.stderr
        free = json.loads(out.stdout)["steps"][0]["output"]
        assert free == {"model": "small-strict", "unloaded": [theirs]}
        assert loaded(lmstudio) == []
    finally:
        lmflow_cmd("models", "unload", "--all", "--server", lmstudio)


@pytest.mark.engine
def test_a_load_that_timed_out_is_unloaded_at_the_end_of_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    """LM Studio may finish a load after lmflow stopped waiting for it: the run's end unloads it."""
    import lmflow.backends.lmstudio as lmstudio_backend
    from lmflow.engine.records import RunRecorder
    from lmflow.engine.runtime import Runtime
    from lmflow.errors import BackendTimeout

    url = lmstudio_server_factory(models=[{"key": "smollm2-135m-instruct"}], load_answer_delay_seconds=6).url
    monkeypatch.setattr(lmstudio_backend, "LOAD_TIMEOUT", 2.0)
    spec = load_spec(write_spec(tmp_path, url, "{key: smollm2-135m-instruct, context_length: 1536}",
                                "- {id: ask, prompt: {model: smol, user: hi}}\n"))
    recorder = RunRecorder(spec)
    runtime = Runtime(spec, recorder)
    with pytest.raises(BackendTimeout):
        runtime.ready("smol")
    assert [c for _k, _i, c in loaded(url)] == [1536]  # the server went on with it
    runtime.close()
    recorder.save()
    assert loaded(url) == []
    assert any("its load timed out, and the server finished it later" in e.get("message", "")
               for e in recorder.result.events), recorder.result.events
