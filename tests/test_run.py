"""`lmflow run` end to end: real lmflow processes, a real Prefect server, a real llama-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import BIN, ROOT, lmflow_cmd, wait_for

from lmflow.engine.records import read_record

pytestmark = [pytest.mark.engine, pytest.mark.prefect, pytest.mark.slow]


def engines_with_alias(alias: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if (cmd and cmd[0].endswith("llama-server") and alias in cmd
                and proc.info["status"] != psutil.STATUS_ZOMBIE):
            found.append(proc)
    return found


HELPERS = """\
import time


def add(a, b):
    return a + b


def wait(seconds):
    time.sleep(seconds)
    return seconds
"""


def write_spec(folder: Path, body: str, name: str = "t") -> Path:
    (folder / "helpers.py").write_text(HELPERS)
    path = folder / f"{name}.yaml"
    path.write_text(f"version: 1\nname: {name}\n" + textwrap.dedent(body))
    return path


def test_quickstart_runs_then_reuses_its_cache(prefect_api: str) -> None:
    first = lmflow_cmd("run", "examples/quickstart.yaml", "-p", "topic=the sea")
    assert first.returncode == 0, first.stderr
    assert "on Prefect server http://127.0.0.1:" in first.stderr
    rows = {line.split()[0]: line.split() for line in first.stdout.splitlines()[2:5]}
    assert [rows[s][2] for s in ("fact", "classify", "stats")] == ["completed"] * 3
    assert "Traceback" not in first.stderr and "| INFO" not in first.stderr
    record_line = next(x for x in first.stdout.splitlines() if x.startswith("run record: "))
    record = json.loads(Path(record_line.removeprefix("run record: ")).read_text())
    stats = record["steps"][2]["output"]
    assert stats["sentiment"] in ("positive", "neutral", "negative")
    assert stats["words"] == len(record["steps"][0]["output"].split())
    assert engines_with_alias("smol") == []  # the engine it started is gone

    second = lmflow_cmd("run", "examples/quickstart.yaml", "-p", "topic=the sea", "--json")
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert [s["status"] for s in result["steps"]] == ["cached"] * 3
    assert [s["output"] for s in result["steps"]] == [s["output"] for s in record["steps"]]

    # the run is in Prefect: a flow named after the spec, one task run per step id
    flow_run = httpx.get(f"{prefect_api}/flow_runs/{result['flow_run_id']}", timeout=30).json()
    flow = httpx.get(f"{prefect_api}/flows/{flow_run['flow_id']}", timeout=30).json()
    assert flow["name"] == "quickstart"
    assert flow_run["state"]["type"] == "COMPLETED"
    tasks = wait_for(lambda: (r := httpx.post(
        f"{prefect_api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [result["flow_run_id"]]}}}).json()) and len(r) == 3 and r,
        timeout=60)
    assert tasks, "task runs did not reach the Prefect server"
    assert sorted(t["name"].rsplit("-", 1)[0] for t in tasks) == ["classify", "fact", "stats"]


def test_changed_param_recomputes_only_what_depends_on_it(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        params: {a: 1, b: 2}
        steps:
          - id: one
            python: {function: "helpers:add", args: {a: "${{ params.a }}", b: 10}}
          - id: two
            python: {function: "helpers:add", args: {a: "${{ params.b }}", b: 10}}
    """, name="partial")
    first = lmflow_cmd("run", str(spec), "--json")
    assert first.returncode == 0, first.stderr
    again = json.loads(lmflow_cmd("run", str(spec), "-p", "b=5", "--json").stdout)
    assert [(s["status"], s["output"]) for s in again["steps"]] == [("cached", 11), ("completed", 15)]


def test_a_run_whose_output_pipe_closes_still_completes(prefect_api: str, tmp_path: Path) -> None:
    """`lmflow run spec 2>&1 | head -1`: the reader leaving is not a failed pipeline."""
    spec = write_spec(tmp_path, """\
        defaults: {cache: false}
        steps:
          - id: first
            python: {function: "helpers:wait", args: {seconds: 0.5}}
          - id: second
            python: {function: "helpers:add", args: {a: "${{ steps.first.output }}", b: 1}}
    """, name="piped")
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    with proc.stdout:  # type: ignore[union-attr]
        assert proc.stdout.readline().startswith("lmflow: running piped")  # type: ignore[union-attr]
    proc.wait(120)
    [record_path] = (Path(os.environ["LMFLOW_HOME"]) / "runs").glob("piped-*.json")
    record = read_record(record_path)
    assert record["error"] is None
    assert [(s["id"], s["status"], s["output"]) for s in record["steps"]] == [
        ("first", "completed", 0.5), ("second", "completed", 1.5)]
    assert any("the run's listener failed (BrokenPipeError" in e.get("message", "") for e in record["events"])
    state = httpx.get(f"{prefect_api}/flow_runs/{record['flow_run_id']}", timeout=30).json()["state_type"]
    assert state == "COMPLETED"


def test_unreachable_server_that_cannot_be_started(prefect_api: str, tmp_path: Path) -> None:
    from lmflow.backends.local import free_port

    port = free_port()
    spec = write_spec(tmp_path, f"""\
        server: {{backend: openai, url: "http://127.0.0.1:{port}", start: lms server start}}
        models: {{m: {{key: some-model}}}}
        defaults: {{retries: 2, retry_delay: 0.1s, cache: false}}
        steps:
          - id: ask
            prompt: {{model: m, user: hi}}
          - id: after
            after: [ask]
            python: {{function: "helpers:add", args: {{a: 1, b: 1}}}}
    """, name="down")
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 1
    # `lms` is not installed here: lmflow says so at once instead of retrying
    assert out.stderr.splitlines()[-1] == (
        f"error: step 'ask' failed: cannot reach http://127.0.0.1:{port} "
        f"(ConnectError: [Errno 111] Connection refused): start it with `lms server start`; "
        "restarting it failed: cannot run `lms server start` (server.start): "
        "[Errno 2] No such file or directory: 'lms'")
    rows = {words[0]: words[2] for words in map(str.split, out.stdout.splitlines())
            if words[:2] in (["ask", "prompt"], ["after", "python"])}  # not an error's wrapped lines
    assert rows == {"ask": "failed", "after": "skipped"}
    assert "Traceback" not in out.stderr


def test_unreachable_server_fails_the_step_after_retries(prefect_api: str, tmp_path: Path) -> None:
    from lmflow.backends.local import free_port

    port = free_port()
    spec = write_spec(tmp_path, f"""\
        server: {{backend: openai, url: "http://127.0.0.1:{port}"}}
        models: {{m: {{key: some-model}}}}
        defaults: {{retries: 2, retry_delay: 0.1s, cache: false}}
        steps:
          - id: ask
            prompt: {{model: m, user: hi}}
    """, name="down2")
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f"error: step 'ask' failed after 3 attempts: cannot reach http://127.0.0.1:{port} "
        f"(ConnectError: [Errno 111] Connection refused): start the server or fix server.url")


def test_errors_that_cannot_heal_are_not_retried(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        models: {smol: {key: smollm2-135m-instruct, context_length: 256}}
        defaults: {retries: 3, retry_delay: 0.1s}
        steps:
          - id: big
            prompt: {model: smol, user: "${{ params.text }}", max_tokens: 5}
        params: {text: ""}
    """, name="overflow")
    out = lmflow_cmd("run", str(spec), "-p", "text=" + "word " * 400)
    assert out.returncode == 1
    last = out.stderr.splitlines()[-1]
    assert last.startswith("error: step 'big' failed: context overflow at http://127.0.0.1:")
    assert "the loaded context holds 256: shorten the prompt" in last


def test_user_code_error_names_the_place(prefect_api: str, tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("def boom(x):\n    return 1 / x\n")
    spec = write_spec(tmp_path, """\
        steps:
          - id: divide
            python: {function: "mine:boom", args: {x: 0}}
    """, name="boom")
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        "error: step 'divide' failed: mine:boom raised ZeroDivisionError: division by zero "
        f"at {tmp_path / 'mine.py'}:2")


SLOW = """\
    models: {{{alias}: {{key: smollm2-135m-instruct, context_length: 512}}}}
    defaults: {{cache: false}}
    steps:
      - id: warm
        prompt: {{model: {alias}, user: "Say hi.", max_tokens: 4}}
      - id: wait
        after: [warm]
        python: {{function: "helpers:wait", args: {{seconds: 120}}}}
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, -9), (signal.SIGTERM, 143),
                                           (signal.SIGINT, 130)])
def test_killed_run_leaves_no_engine_behind(prefect_api: str, tmp_path: Path,
                                            sig: int, code: int) -> None:
    alias = f"kill{int(sig)}"
    spec = write_spec(tmp_path, SLOW.format(alias=alias), name=f"kill{int(sig)}")
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        assert wait_for(lambda: engines_with_alias(alias), timeout=60), "engine never started"
        # wait until the prompt step is done and the run sits in the sleeping step
        records = Path(os.environ["LMFLOW_HOME"]) / "runs"
        assert wait_for(lambda: any('{"step": "wait", "status": "running"}' in p.read_text()
                                    for p in records.glob(f"kill{int(sig)}-*.jsonl")), timeout=60)
        proc.send_signal(sig)
        assert proc.wait(60) == code  # (a stopping run reports to Prefect: slow on a busy box)
        assert wait_for(lambda: not engines_with_alias(alias), timeout=60), "llama-server outlived lmflow"
        record = read_record(next(records.glob(f"kill{int(sig)}-*.jsonl")))
        assert record["steps"][0]["status"] == "completed"  # what was done is kept
        assert record["steps"][0]["output"]
        # a kill leaves the journal as it was; a signal the run hears is recorded as what it was
        assert record["steps"][1]["status"] == ("running" if sig == signal.SIGKILL else "interrupted")
        assert record.get("interrupted", False) is (sig == signal.SIGKILL)
        if sig != signal.SIGKILL:
            assert record["error"].startswith(f"the run was interrupted by {signal.Signals(sig).name}")
        else:  # Prefect would show it running for good: the next command marks it Crashed
            journal = next(records.glob(f"kill{int(sig)}-*.jsonl")).read_text()
            flow_run_id = json.loads(next(x for x in journal.splitlines() if '"flow_run"' in x))["flow_run"]

            def task_runs() -> list[dict]:
                return httpx.post(f"{prefect_api}/task_runs/filter", timeout=30,
                                  json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()

            # the server records task runs from events, seconds late (those the kill did not lose)
            wait_for(lambda: {"warm", "wait"} <= {t["name"] for t in task_runs()}, timeout=20)
            listed = lmflow_cmd("runs", "--json")
            assert listed.returncode == 0, listed.stderr
            (killed,) = [r for r in json.loads(listed.stdout) if r["name"] == record["run_id"]]
            assert killed["state"] == "Crashed"
            assert [t["name"] for t in task_runs() if t["state_type"] in ("RUNNING", "PENDING")] == []
            # the engine's PID file outlived the killed run; the next run forgets it
            pids = Path(os.environ["LMFLOW_HOME"]) / "pids"
            assert list(pids.glob("*.json"))
            after = write_spec(tmp_path, """\
                defaults: {cache: false}
                steps:
                  - id: after
                    python: {function: "helpers:add", args: {a: 1, b: 2}}
            """, name="after")
            assert lmflow_cmd("run", str(after)).returncode == 0
            assert list(pids.glob("*.json")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for orphan in engines_with_alias(alias):
            orphan.kill()


def test_with_the_temporary_setting_lmflow_uses_a_temporary_server_and_stops_it(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        steps:
          - id: one
            python: {function: "helpers:add", args: {a: 1, b: 2}}
    """, name="temp")
    env = {"LMFLOW_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "LMFLOW_PREFECT_SERVER": "temporary"}
    out = lmflow_cmd("run", str(spec), env=env)  # how fast: bench/first_run.py
    assert out.returncode == 0, out.stderr
    assert "starting a temporary Prefect server for this run" in out.stderr
    assert "one  " in out.stdout and "completed" in out.stdout
    assert list((tmp_path / "home" / "pids").glob("*.json")) == []
    assert not (tmp_path / "home" / "prefect-server" / "server.json").exists()


def test_killed_run_leaves_no_temporary_prefect_server(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        defaults: {cache: false}
        steps:
          - id: wait
            python: {function: "helpers:wait", args: {seconds: 120}}
    """, name="tempkill")
    home = tmp_path / "home"
    env = {**os.environ, "LMFLOW_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
           "LMFLOW_PREFECT_SERVER": "temporary"}
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        records = home / "runs"
        assert wait_for(lambda: any('"running"' in p.read_text() for p in records.glob("*.jsonl")),
                        timeout=120)
        servers = [json.loads(p.read_text())["pid"] for p in (home / "pids").glob("*.json")]
        assert len(servers) == 1
        proc.kill()
        proc.wait(10)
        assert wait_for(lambda: not psutil.pid_exists(servers[0])
                        or psutil.Process(servers[0]).status() == psutil.STATUS_ZOMBIE, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lifecycle_steps_run_unchanged_on_the_managed_engine(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        models: {lc: {key: smollm2-135m-instruct, context_length: 1024}}
        defaults: {cache: false}
        steps:
          - id: up
            ensure_server: {}
          - id: load
            load_model: {model: lc, strict: true}
          - id: gen5
            prompt: {model: lc, user: "Analyse generation 5.", max_tokens: 4}
          - id: free
            reload_model: {model: lc, context_length: 2048}
          - id: gen10
            prompt: {model: lc, user: "Analyse generation 10.", max_tokens: 4}
          - id: bye
            unload_model: {model: lc}
    """, name="locallife")
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    steps = {s["id"]: s for s in json.loads(out.stdout)["steps"]}
    assert steps["load"]["output"]["context_length"] == 1024
    assert steps["free"]["output"]["context_length"] == 2048
    assert engines_with_alias("lc") == []


def test_a_managed_engine_killed_mid_map_is_restarted_and_recorded(prefect_api: str, tmp_path: Path) -> None:
    alias = "crashing"
    spec = write_spec(tmp_path, f"""\
        models: {{{alias}: {{key: smollm2-135m-instruct, context_length: 512}}}}
        defaults: {{cache: false, retries: 2, retry_delay: 0.5s}}
        params: {{xs: {list(range(40))}}}
        steps:
          - id: ask
            foreach: ${{{{ params.xs }}}}
            parallel: 1
            prompt: {{model: {alias}, user: "Count to ${{{{ item }}}}.", max_tokens: 8}}
    """, name="crashing")
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec), "--json"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        records = Path(os.environ["LMFLOW_HOME"]) / "runs"
        assert wait_for(lambda: any(p.read_text().count('"item":') >= 5
                                    for p in records.glob("crashing-*.jsonl")), timeout=120)
        (engine,) = engines_with_alias(alias)
        engine.kill()  # the engine dies in the middle of the map
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for orphan in engines_with_alias(alias):
            orphan.kill()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert len(result["steps"][0]["output"]) == 40  # every item answered
    restarts = [e for e in result["events"] if e.get("event") == "server_restarted"]
    assert [(r["model"], r["exit_code"]) for r in restarts] == [(alias, -9)]
    said = f"the local llama.cpp engine for '{alias}' died (exit code -9); restarted it"
    assert any(said in e.get("message", "") for e in result["events"])
