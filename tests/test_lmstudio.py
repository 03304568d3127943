"""lmflow's LM Studio backend and lifecycle steps against the LM Studio-compatible test server.

The server is started the way users' own tests start it (the pytest plugin lmflow ships, which
runs `lmflow testing serve --config`), answers with real inference through llama-server children,
and is stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import BIN, MODELS, ROOT, closing, lmflow_cmd, lmflow_in_process, wait_for

from lmflow.backends.base import ChatRequest
from lmflow.backends.lmstudio import LMStudioBackend, WrongModel
from lmflow.errors import BackendError, BackendHTTPError
from lmflow.spec.model import ModelConfig, Policy, ServerConfig
from lmflow.steps import FixedModels, StepContext, get_kind
from lmflow.steps.load_model import ContextMismatch
from lmflow.testing.pytest_plugin import RunningServer, running_lmstudio_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]

def loaded_instances(url: str) -> list[tuple[str, int]]:
    models = httpx.get(f"{url}/api/v1/models").json()["models"]
    return [(i["id"], i["config"]["context_length"]) for m in models for i in m["loaded_instances"]]


def backend(url: str) -> LMStudioBackend:
    return closing(LMStudioBackend(ServerConfig(name="default", backend="lmstudio", url=url)))


SMOL = ModelConfig(alias="smol", key="smollm2-135m-instruct", context_length=2048)


def ask(b: LMStudioBackend, model: ModelConfig = SMOL) -> str:
    return b.chat(ChatRequest(model=model, messages=[{"role": "user", "content": "Say hi."}],
                              sampling={"max_tokens": 4, "temperature": 0})).text


def test_models_lists_declared_and_loaded_context(lmstudio: str) -> None:
    out = lmflow_in_process("models", "--server", lmstudio)
    assert out.exit_code == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["key", "loaded", "max", "context", "loaded", "context"]
    assert "smollm2-135m-instruct  no      8192" in out.stdout


def test_load_unload_reload_keeps_one_client(lmstudio: str) -> None:
    b = backend(lmstudio)
    try:
        http = b.client.http
        info = b.load(SMOL)
        assert (info.instance_id, info.loaded_context_length) == ("smollm2-135m-instruct", 2048)
        assert ask(b)
        b.unload(SMOL)
        assert loaded_instances(lmstudio) == []
        info = b.load(SMOL)
        assert ask(b)
        assert b.client.http is http  # the same client across the unload/reload cycle
        assert loaded_instances(lmstudio) == [("smollm2-135m-instruct", 2048)]
    finally:
        b.unload(SMOL)
        b.close()


def test_silent_clamp_is_read_back(lmstudio: str) -> None:
    b = backend(lmstudio)
    big = ModelConfig(alias="smol", key="smollm2-135m-instruct", context_length=6000)
    try:
        info = b.load(big)
        assert info.loaded_context_length == 3072  # what it got, not what was asked
    finally:
        b.unload(big)
        b.close()


def step_context(b: LMStudioBackend, model: ModelConfig, events: list) -> StepContext:
    return StepContext(step_id="load", spec_dir=ROOT, session=FixedModels({model.alias: (b, model)}),
                       policy=Policy(timeout=60), emit=lambda kind, data: events.append((kind, data)))


def test_load_model_step_warns_or_fails_on_clamping(lmstudio: str) -> None:
    b = backend(lmstudio)
    big = ModelConfig(alias="smol", key="smollm2-135m-instruct", context_length=6000)
    events: list = []
    try:
        result = get_kind("load_model").run({"model": "smol"}, step_context(b, big, events))
        assert result.output["context_length"] == 3072
        assert result.output["requested_context_length"] == 6000
        assert events == [("warning", {"message": f"{b.url} loaded 'smollm2-135m-instruct' with "
                                                  "context 3072, not the 6000 asked for"})]
        with pytest.raises(ContextMismatch, match="strict: true"):
            get_kind("reload_model").run({"model": "smol", "strict": True}, step_context(b, big, []))
    finally:
        b.unload(big)
        b.close()


def test_load_beyond_what_fits_fails_clearly(lmstudio: str) -> None:
    b = backend(lmstudio)
    with pytest.raises(BackendHTTPError) as info:
        b.load(ModelConfig(alias="s", key="small-strict", context_length=4096))
    assert info.value.status == 500
    assert "not enough memory for a context of 4096 tokens" in str(info.value)
    b.close()


def test_unknown_model_lists_what_exists(lmstudio: str) -> None:
    b = backend(lmstudio)
    with pytest.raises(BackendHTTPError) as info:
        b.load(ModelConfig(alias="coach", key="google/gemma-3-12b"))
    assert str(info.value) == (
        f"LM Studio at {lmstudio} has no model 'google/gemma-3-12b' (models.coach.key); "
        "it has: smollm2-135m-instruct, small-strict, retriever")
    b.close()


def test_answer_from_another_model_is_caught(lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    b = backend(lmstudio_server_factory(models=MODELS, ignore_model_field=True).url)
    try:
        b.load(ModelConfig(alias="s", key="small-strict", context_length=1024))
        with pytest.raises(WrongModel,
                           match="asked .* for 'smollm2-135m-instruct' but 'small-strict' answered"):
            ask(b)
    finally:
        b.close()


TOKEN = "sk-lm-Ab3dEf7h:Q1w2E3r4T5y6U7i8O9p0"  # the shape LM Studio gives its API tokens


def test_api_token_over_rest_and_the_sdk(monkeypatch: pytest.MonkeyPatch,
                                         lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    url = lmstudio_server_factory(models=MODELS, api_token=TOKEN).url
    with pytest.raises(BackendHTTPError) as info:
        backend(url).list_models()
    assert info.value.status == 401
    assert "set the API token (server.api_key_env)" in str(info.value)
    monkeypatch.setenv("LM_API_TOKEN", TOKEN)
    b = backend(url)
    assert [m.key for m in b.list_models()] == ["smollm2-135m-instruct", "small-strict", "retriever"]
    # ttl needs the SDK: its websocket authenticates with the token's two halves
    timed = ModelConfig(alias="timed", key="smollm2-135m-instruct", context_length=1024, ttl=600)
    assert b.load(timed).loaded_context_length == 1024
    assert ask(b, timed)
    assert 2 <= (b.count_tokens(timed, "one two three") or 0) <= 6  # the server's own tokenizer
    b.unload(timed)
    b.close()
    monkeypatch.setenv("LM_API_TOKEN", "s3cret")  # not an LM Studio token: the SDK cannot use it
    with pytest.raises(BackendError, match=r"is not an LM Studio API token \(sk-lm-XXXXXXXX:"):
        backend(url).load(timed)


def write_spec(tmp: Path, url: str, steps: str) -> Path:
    (tmp / "helpers.py").write_text("def fail():\n    raise RuntimeError('boom')\n")
    path = tmp / "life.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        name: lifecycle
        server: {{backend: lmstudio, url: "{url}"}}
        models:
          smol: {{key: smollm2-135m-instruct, context_length: 2048}}
        defaults: {{cache: false}}
        steps:
        """) + textwrap.indent(textwrap.dedent(steps), "  "))
    return path


def test_analyse_unload_reload_analyse_in_one_run(lmstudio: str, prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, lmstudio, """\
        - id: load
          load_model: {model: smol, warmup: "Hello"}
        - id: gen5
          prompt: {model: smol, user: "Analyse generation 5.", max_tokens: 8}
        - id: free
          reload_model: {model: smol}
        - id: gen10
          prompt: {model: smol, user: "Analyse generation 10.", max_tokens: 8}
        - id: bye
          unload_model: {model: smol}
        """)
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [s["status"] for s in result["steps"]] == ["completed"] * 5
    assert result["steps"][0]["output"]["context_length"] == 2048
    assert loaded_instances(lmstudio) == []


def test_a_failed_run_still_unloads_what_it_loaded(lmstudio: str, prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, lmstudio, """\
        - id: load
          load_model: {model: smol}
        - id: boom
          python: {function: "helpers:fail"}
        """)
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 1
    assert "step 'boom' failed: helpers:fail raised RuntimeError: boom" in out.stderr
    assert loaded_instances(lmstudio) == []


KILLER = """\
import os
import signal

import psutil


def kill_server(port):
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            os.kill(conn.pid, signal.SIGKILL)
            return conn.pid
    raise RuntimeError(f"nothing listens on {port}")
"""


def listening(port: int) -> bool:
    import psutil

    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.net_connections(kind="tcp"))


def test_server_started_by_lmflow_and_restarted_after_a_crash(prefect_api: str, tmp_path: Path) -> None:
    from lmflow.backends.local import free_port

    port = free_port()
    (tmp_path / "cfg.yaml").write_text("models:\n  - key: smollm2-135m-instruct\n")
    (tmp_path / "killer.py").write_text(KILLER)
    start = f"{BIN / 'lmflow'} testing serve --port {port} --config {tmp_path / 'cfg.yaml'}"
    spec = tmp_path / "crash.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: crash
        server:
          backend: lmstudio
          url: http://127.0.0.1:{port}
          start: {start}
          max_restarts: 1
        models: {{smol: {{key: smollm2-135m-instruct, context_length: 1024}}}}
        defaults: {{cache: false}}
        steps:
          - id: up
            ensure_server: {{}}
          - id: load
            load_model: {{model: smol}}
          - id: before
            prompt: {{model: smol, user: "Say hi.", max_tokens: 4}}
          - id: crash
            after: [before]
            python: {{function: "killer:kill_server", args: {{port: {port}}}}}
          - id: after
            after: [crash]
            prompt: {{model: smol, user: "Say hi again.", max_tokens: 4}}
        """))
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["steps"][0]["output"]["started"] is True
    assert [s["status"] for s in result["steps"]] == ["completed"] * 5
    assert f"http://127.0.0.1:{port} was down; restarted it with" in out.stderr
    assert "(restart 1 of 1)" in out.stderr
    restarts = [e for e in result["events"] if e["event"] == "server_restarted"]
    assert len(restarts) == 1 and restarts[0]["step"] == "after"
    assert not listening(port)  # the server lmflow started is stopped with the run


def test_fault_modes_of_the_test_server(tmp_path: Path) -> None:
    from lmflow.errors import BackendTimeout, BackendUnreachable

    with running_lmstudio_server(tmp_path / "slow", models=MODELS, delay_seconds=3, jit=False) as slow:
        b = backend(slow.url)
        with pytest.raises(BackendHTTPError, match="not loaded and JIT loading is off"):
            ask(b)
        b.load(SMOL)
        with pytest.raises(BackendTimeout, match="within 1s"):
            b.chat(ChatRequest(model=SMOL, messages=[{"role": "user", "content": "hi"}],
                               sampling={"max_tokens": 2}, timeout=1))
        b.close()
    with running_lmstudio_server(tmp_path / "crashing", models=MODELS, crash_on_request=2) as crashing:
        url = crashing.url
        b = backend(url)
        assert ask(b)  # JIT: loads on first use
        assert loaded_instances(url) == [("smollm2-135m-instruct", 3072)]  # 4096 by default, clamped
        with pytest.raises(BackendUnreachable):
            ask(b)  # the server dies in the middle of this request
        assert crashing.process.wait(10) == 70
        b.close()


FAKE_LMS = """\
#!{python}
# `lms server start|stop` as LM Studio's CLI behaves: start leaves the server running as a daemon
import os, signal, subprocess, sys
pidfile = {pidfile!r}
if sys.argv[1:] == ["server", "start"]:
    daemon = subprocess.Popen({serve!r}, start_new_session=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    open(pidfile, "w").write(str(daemon.pid))
elif sys.argv[1:] == ["server", "stop"]:
    os.kill(int(open(pidfile).read()), signal.SIGTERM)
else:
    sys.exit(2)
"""


def daemon_spec(tmp_path: Path, start: str, port: int) -> Path:
    spec = tmp_path / "daemon.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: daemon
        server: {{backend: lmstudio, url: "http://127.0.0.1:{port}", start: "{start}"}}
        models: {{smol: {{key: smollm2-135m-instruct}}}}
        defaults: {{cache: false}}
        steps:
          - id: ask
            prompt: {{model: smol, user: "Say hi.", max_tokens: 4}}
        """))
    return spec


@pytest.mark.parametrize("name", ["lms", "up"])
def test_a_daemonised_server_lmflow_started_is_stopped_or_reported(prefect_api: str, tmp_path: Path,
                                                                   name: str) -> None:
    import sys

    import psutil

    from lmflow.backends.local import free_port

    port = free_port()
    (tmp_path / "cfg.yaml").write_text("models:\n  - key: smollm2-135m-instruct\n")
    pidfile = tmp_path / "server.pid"
    serve = [str(BIN / "lmflow"), "testing", "serve", "--port", str(port), "--config",
             str(tmp_path / "cfg.yaml")]
    script = tmp_path / name
    script.write_text(FAKE_LMS.format(python=sys.executable, pidfile=str(pidfile), serve=serve))
    script.chmod(0o755)
    try:
        out = lmflow_cmd("run", str(daemon_spec(tmp_path, f"{script} server start", port)), "--json")
        assert out.returncode == 0, out.stderr
        events = json.loads(out.stdout)["events"]
        daemon = int(pidfile.read_text())
        if name == "lms":  # `lms server start` is followed by `lms server stop`
            assert wait_for(lambda: not psutil.pid_exists(daemon) or
                            psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE, timeout=60)
            assert not listening(port)
        else:  # a start command lmflow does not know: the run says the server is left running
            assert listening(port)
            assert any(f"left the server at http://127.0.0.1:{port} running as a daemon, and it is "
                       "still running: set server.stop" in e.get("message", "") for e in events), events
    finally:
        if pidfile.exists() and psutil.pid_exists(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
            psutil.Process(int(pidfile.read_text())).wait(30)


def test_a_prompt_that_cannot_fit_is_refused_with_the_servers_own_count(lmstudio: str) -> None:
    from lmflow.errors import ContextOverflow

    b = backend(lmstudio)
    small = ModelConfig(alias="small", key="smollm2-135m-instruct", context_length=1024)
    b.load(small)
    try:
        fits = "The sky is blue. " * 100  # 1,700 bytes (more than the context), about 500 tokens
        assert b.chat(ChatRequest(model=small, messages=[{"role": "user", "content": fits}],
                                  sampling={"max_tokens": 4})).prompt_tokens < 1024
        too_long = "The sky is blue. " * 300  # about 1,500 tokens
        with pytest.raises(ContextOverflow) as info:
            b.chat(ChatRequest(model=small, messages=[{"role": "user", "content": too_long}],
                               sampling={"max_tokens": 4}))
        assert f"(counted by {lmstudio})" in str(info.value)
        assert "more than the 1024 that smollm2-135m-instruct was loaded with" in str(info.value)
        assert not info.value.retryable
    finally:
        b.unload(small)
        b.close()


def test_lm_studio_before_0_4_is_detected_and_used(
        tmp_path: Path, prefect_api: str, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    """REST v0 only: lmflow lists with v0 and loads, lists and unloads instances with the SDK."""
    url = lmstudio_server_factory(models=MODELS, rest_api="v0").url
    assert httpx.get(f"{url}/api/v1/models").status_code == 404
    b = backend(url)
    assert b.health()  # up, not "down" because v1 is missing
    assert [m.key for m in b.list_models()] == ["smollm2-135m-instruct", "small-strict", "retriever"]
    info = b.load(SMOL)
    assert (info.loaded_context_length, b.rest_v1) == (2048, False)
    assert ask(b)
    assert b.loaded_instances() == [("smollm2-135m-instruct", info.instance_id)]
    assert b.find_loaded(SMOL).instance_id == info.instance_id
    assert b.unload(SMOL) == [info.instance_id]
    assert b.loaded_instances() == []
    b.close()
    out = lmflow_in_process("models", "--server", url)
    assert out.exit_code == 0, out.stderr
    spec = write_spec(tmp_path, url, f"""\
        - id: ask
          prompt: {{model: smol, user: "Say hi.", max_tokens: 4}}
        - id: look
          after: [ask]
          python: {{function: "v0:loaded", args: {{url: "{url}"}}}}
        """)
    (tmp_path / "v0.py").write_text(
        "import json, urllib.request\n\n\ndef loaded(url):\n"
        "    with urllib.request.urlopen(url + '/api/v0/models') as answer:\n"
        "        return [[m['id'], m.get('loaded_context_length')] for m in json.load(answer)['data']\n"
        "                if m['state'] == 'loaded']\n")
    run = lmflow_cmd("run", str(spec), "--json")
    assert run.returncode == 0, run.stderr
    look = json.loads(run.stdout)["steps"][1]["output"]
    assert look == [["smollm2-135m-instruct", 2048]]  # as declared, loaded through the SDK
    assert backend(url).loaded_instances() == []  # and unloaded at the end


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"),
                                                   (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_during_a_map_unloads_the_model_and_loads_nothing_on_the_way_out(
        prefect_api: str, tmp_path: Path, sig: int, code: int, name: str,
        lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    import subprocess

    url = lmstudio_server_factory(models=MODELS, delay_seconds=0.4).url  # items stay in flight
    spec = write_spec(tmp_path, url, """\
        - id: ask
          foreach: ${{ params.xs }}
          parallel: 4
          retries: 3
          retry_delay: 0.1s
          prompt: {model: smol, user: "Say ${{ item }}.", max_tokens: 2}
        - id: count
          python: {function: "helpers:fail"}
        """)
    spec.write_text(spec.read_text() + "params: {xs: [" + ", ".join(map(str, range(60))) + "]}\n")
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    records = Path(os.environ["LMFLOW_HOME"]) / "runs"
    try:
        assert wait_for(lambda: any(p.read_text().count('"item":') >= 6
                                    for p in records.glob("lifecycle-*.jsonl")), timeout=90)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert loaded_instances(url) == []  # unloaded by the run's end, and not loaded again
    journal = next(records.glob("lifecycle-*.jsonl"))
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [e for e in lines if "loading" in e or "loaded" in e or "unloaded" in e] == [
        {"loading": "smol", "key": "smollm2-135m-instruct", "server": "default", "backend": "lmstudio",
         "url": url, "context_length": 2048, "before": []},
        {"loaded": "smol", "key": "smollm2-135m-instruct", "server": "default", "backend": "lmstudio",
         "url": url, "instance": "smollm2-135m-instruct"},
        {"unloaded": "smol"}]
    record = json.loads(journal.with_suffix(".json").read_text())
    assert record["error"].startswith(f"the run was interrupted by {name}"), record["error"]
    steps = {s["id"]: s for s in record["steps"]}
    assert steps["ask"]["status"] == "interrupted"
    assert steps["count"]["status"] == "skipped"
    assert f"error: the run was interrupted by {name}" in stderr
    assert f"run record: {journal.with_suffix('.json')}" in stderr
