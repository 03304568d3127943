"""Run history from the terminal through the Prefect API: `lmflow runs`, `lmflow runs show`,
`lmflow rerun`, with real `lmflow` processes, a real Prefect server and real git repositories.

The session's Prefect server is shared by every test: each test's spec has a name of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import BIN, ROOT, lmflow_cmd, wait_for

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

#: an error long enough that cutting it anywhere would show: its end must arrive
LONG = "the reason, in words " * 20 + "END-OF-MESSAGE"

HELPERS = f"""\
def check(fail):
    if fail:
        raise ValueError({LONG!r})
    return "fine"


def guess(request):
    return "guessed after " + request["errors"][0]["error_type"]
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def new_repo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    git(folder, "init", "-q")
    git(folder, "config", "user.email", "t@example.com")
    git(folder, "config", "user.name", "t")
    return folder


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run_json(*args: str, code: int = 0) -> tuple[dict, str]:
    out = lmflow_cmd(*args, "--json")
    assert out.returncode == code, out.stderr
    return json.loads(out.stdout), out.stderr


def test_runs_lists_a_specs_runs_newest_first(prefect_api: str, tmp_path: Path) -> None:
    name = unique("history-list")
    repo = new_repo(tmp_path / "repo")
    (repo / "specs" / "helpers.py").parent.mkdir()
    (repo / "specs" / "helpers.py").write_text(HELPERS)
    spec = write(repo / "specs" / "list.yaml", f"""\
        version: 1
        name: {name}
        params: {{fail: false}}
        steps:
          - id: dump
            python: {{function: "json:dumps", args: {{obj: [1, 2]}}}}
          - id: check
            python: {{function: "helpers:check", args: {{fail: "${{{{ params.fail }}}}"}}}}
          - id: after
            after: [check]
            python: {{function: "json:dumps", args: {{obj: done}}}}
        """)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "spec")
    commit = git(repo, "rev-parse", "HEAD")[:12]

    first, _ = run_json("run", str(spec))
    second, _ = run_json("run", str(spec), "-p", "fail=true", code=1)

    listed = json.loads(lmflow_cmd("runs", str(spec), "--json").stdout)  # a spec file: its name
    assert [r["name"] for r in listed] == [second["run_id"], first["run_id"]]
    assert [r["state"] for r in listed] == ["Failed", "Completed"]
    assert [r["failed"] for r in listed] == [["check"], []]
    assert [r["cached"] for r in listed] == [1, 0]  # dump was reused by the second run
    assert [r["cached_answers"] for r in listed] == [0, 0]  # (no model: no response cache)
    sha = hashlib.sha256(spec.read_bytes()).hexdigest()[:12]
    assert [r["version"] for r in listed] == [{"commit": commit, "dirty": False, "sha256": sha}] * 2
    assert all(r["seconds"] > 0 for r in listed)

    # options before or after the SPEC, and a spec's bare name
    out = lmflow_cmd("runs", "--limit", "1", name)
    assert out.returncode == 0, out.stderr
    header, rule, row = out.stdout.splitlines()
    assert header.split() == ["run", "state", "start", "duration", "failed", "cached", "step/answer", "spec"]
    assert row.split()[:2] == [second["run_id"], "Failed"] and row.split()[-3:] == ["check", "1/0", commit]
    assert lmflow_cmd("runs", name, "--limit", "1").stdout == out.stdout

    # the summary in Prefect's UI is the run's table, errors whole
    artifacts = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30, json={
        "artifacts": {"flow_run_id": {"any_": [second["flow_run_id"]]}}}).json()
    summary = next(a for a in artifacts if a["key"] == f"lmflow-summary-{name}")
    assert summary["type"] == "table"
    rows = {r["step"]: r for r in json.loads(summary["data"])}
    assert [(s, r["status"], r["cached"]) for s, r in rows.items()] == [
        ("dump", "cached", "step"), ("check", "failed", "no"), ("after", "skipped", "no")]
    assert rows["check"]["result"].endswith(f"{LONG} at {repo / 'specs' / 'helpers.py'}:3")
    assert rows["check"]["attempts"] == 1 and rows["after"]["result"] == "upstream failed: check"
    assert second["run_id"] in summary["description"] and commit in summary["description"]


def test_runs_show_has_every_step_with_answered_by_and_errors(prefect_api: str, tmp_path: Path) -> None:
    from lmflow.backends.local import free_port

    name = unique("history-show")
    (tmp_path / "helpers.py").write_text(HELPERS)
    port = free_port()  # nothing listens: the model's server is down, its python fallback answers
    spec = write(tmp_path / "show.yaml", f"""\
        version: 1
        name: {name}
        params: {{word: hi}}
        server: {{backend: openai, url: "http://127.0.0.1:{port}"}}
        models:
          big: {{key: some-big-model, fallback: [{{python: "helpers:guess"}}]}}
        defaults: {{cache: false}}
        steps:
          - id: ask
            prompt: {{model: big, user: "${{{{ params.word }}}}"}}
          - id: check
            python: {{function: "helpers:check", args: {{fail: true}}}}
          - id: echo
            python: {{function: "json:dumps", args: {{obj: "${{{{ params.word }}}}"}}}}
        """)
    result, _ = run_json("run", str(spec), "-p", "word=hello", code=1)

    out = lmflow_cmd("runs", "show", result["run_id"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    lines = text.splitlines()
    assert lines[0] == f"run     {result['run_id']} ({result['flow_run_id']})"
    assert lines[1].startswith("state   Failed, started ")
    sha = hashlib.sha256(spec.read_bytes()).hexdigest()[:12]
    assert lines[2] == f"spec    {name}: {spec} at sha256:{sha}"  # not in git: its content hash
    assert lines[3] == 'params  {"word": "hello"} (given; the rest are the spec\'s defaults)'
    assert lines[4] == f"UI      {prefect_api.removesuffix('/api')}/runs/flow-run/{result['flow_run_id']}"
    steps = {line.split()[0]: line.split() for line in lines[8:] if line and not line[0].isspace()
             and line.split()[0] in ("ask", "check", "echo")}
    assert steps["ask"][:7] == ["ask", "prompt", "completed", steps["ask"][3], "1", "no", "python"]
    assert "helpers:guess (fallback 1)" in text
    assert steps["check"][2] == "failed" and steps["echo"][2:3] == ["completed"]
    assert f"  ask model big attempt 1: ConnectionRefused: cannot reach http://127.0.0.1:{port}" in text
    assert "END-OF-MESSAGE" in text.split("errors (")[1]  # wrapped, never cut

    # by a prefix of the flow run's id, as JSON
    shown, _ = run_json("runs", "show", result["flow_run_id"][:8])
    assert shown["name"] == result["run_id"] and shown["steps_from"] == "summary"
    rows = {r["step"]: r for r in shown["steps"]}
    assert rows["ask"]["answered by"] == "python helpers:guess (fallback 1)"
    assert rows["ask"]["result"] == "guessed after ConnectionRefused"
    assert rows["ask"]["errors"].startswith("model big attempt 1: ConnectionRefused: ")
    assert rows["check"]["result"].startswith(f"helpers:check raised ValueError: {LONG}")
    assert shown["parameters"]["params"] == {"word": "hello"} and shown["failed"] == ["check"]

    missing = lmflow_cmd("runs", "show", f"{name}-nope")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (f"error: no lmflow run is named '{name}-nope' or has an id starting "
                                      "with it: `lmflow runs` lists the runs")


SAY = """\
def say(word):
    return "{version} " + word


def check():
    {check}
"""


def test_rerun_runs_the_committed_version_it_ran_from_a_temporary_worktree(
        prefect_api: str, tmp_path: Path) -> None:
    name = unique("history-rerun")
    repo = new_repo(tmp_path / "repo")
    spec = write(repo / "pipelines" / "say.yaml", f"""\
        version: 1
        name: {name}
        params: {{word: one}}
        steps:
          - id: say
            python: {{function: "helpers:say", args: {{word: "${{{{ params.word }}}}"}}}}
          - id: check
            python: {{function: "helpers:check"}}
        """)
    helpers = repo / "pipelines" / "helpers.py"
    helpers.write_text(SAY.format(version="v1", check='raise RuntimeError("v1 is broken")'))
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v1")
    v1 = git(repo, "rev-parse", "HEAD")[:12]
    ran, _ = run_json("run", str(spec), "-p", "word=two", "--max-parallel", "1", code=1)

    # the spec and its helpers change, and are committed
    helpers.write_text(SAY.format(version="v2", check="return 'ok'"))
    spec.write_text(spec.read_text().replace("word: one", "word: uno"))
    git(repo, "commit", "-qam", "v2")

    again, stderr = run_json("rerun", ran["run_id"], "--refresh", code=1)  # v1's check fails again
    steps = {s["id"]: s for s in again["steps"]}
    assert steps["say"]["output"] == "v1 two"  # v2 would say "v2 two"
    assert steps["check"]["status"] == "failed" and "v1 is broken" in steps["check"]["error"]["message"]
    assert (f"lmflow: rerun of {ran['run_id']}: pipelines/say.yaml at commit {v1}, as it ran (the file "
            "has changed since; run from a temporary worktree of ") in stderr
    assert git(repo, "worktree", "list").count("\n") == 0  # only the repository itself
    # the same params and max_parallel, the same version in Prefect
    flow_run = httpx.get(f"{prefect_api}/flow_runs/{again['flow_run_id']}", timeout=30).json()
    assert flow_run["parameters"]["params"] == {"word": "two"}
    assert flow_run["parameters"]["max_parallel"] == 1
    assert f"commit:{v1}" in flow_run["tags"] and "dirty" not in flow_run["tags"]

    # a spec unchanged since its run runs in place
    now, _ = run_json("run", str(spec))
    same, stderr = run_json("rerun", now["run_id"])
    assert [s["output"] for s in same["steps"]] == ["v2 uno", "ok"]
    assert f"lmflow: rerun of {now['run_id']}: {spec} as it ran (unchanged since: sha256 " in stderr


def test_rerun_refuses_a_version_never_committed_and_current_runs_the_spec_as_it_is(
        prefect_api: str, tmp_path: Path) -> None:
    name = unique("history-dirty")
    repo = new_repo(tmp_path / "repo")
    spec = write(repo / "dirty.yaml", f"""\
        version: 1
        name: {name}
        params: {{word: committed}}
        steps:
          - id: echo
            python: {{function: "json:dumps", args: {{obj: "${{{{ params.word }}}}"}}}}
        """)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "spec")
    commit = git(repo, "rev-parse", "HEAD")[:12]
    spec.write_text(spec.read_text().replace("word: committed", "word: edited"))  # never committed
    ran, _ = run_json("run", str(spec))
    assert ran["steps"][0]["output"] == '"edited"'
    listed = json.loads(lmflow_cmd("runs", name, "--json").stdout)
    assert listed[0]["version"]["dirty"] is True
    assert lmflow_cmd("runs", name).stdout.splitlines()[2].endswith(f"{commit} dirty")

    spec.write_text(spec.read_text().replace("word: edited", "word: again"))
    refused = lmflow_cmd("rerun", ran["run_id"])
    assert refused.returncode == 1
    was = ran["spec_version"]["sha256"][:12]
    now = hashlib.sha256(spec.read_bytes()).hexdigest()[:12]
    assert refused.stderr.strip() == (
        f"error: {spec} changed since run {ran['run_id']} (sha256 {was} then, {now} now), and it ran with "
        f"changes never committed on top of commit {commit}: restore that version of the file, or "
        f"`lmflow rerun {ran['run_id']} --current` runs the spec as it is now")

    current, stderr = run_json("rerun", ran["run_id"], "--current")
    assert current["steps"][0]["output"] == '"again"'
    assert (f"lmflow: rerun of {ran['run_id']}: {spec} as it is now (--current: sha256 {now}, the run had "
            f"{was})") in stderr


def test_a_run_still_going_is_shown_from_its_task_runs(prefect_api: str, tmp_path: Path) -> None:
    name = unique("history-going")
    (tmp_path / "helpers.py").write_text("import time\n\n\ndef wait(seconds):\n    time.sleep(seconds)\n")
    spec = write(tmp_path / "going.yaml", f"""\
        version: 1
        name: {name}
        defaults: {{cache: false}}
        steps:
          - id: quick
            python: {{function: "json:dumps", args: {{obj: 1}}}}
          - id: wait
            after: [quick]
            python: {{function: "helpers:wait", args: {{seconds: 120}}}}
          - id: last
            after: [wait]
            python: {{function: "json:dumps", args: {{obj: 2}}}}
        """)
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        def seen() -> dict | None:
            shown = json.loads(lmflow_cmd("runs", "show", name, "--json").stdout or "null")
            statuses = {r["step"]: r["status"] for r in (shown or {}).get("steps", [])}
            return shown if statuses == {"quick": "completed", "wait": "running"} else None

        shown = wait_for(seen, timeout=90, interval=0.5)
        assert shown, "the run's task runs never showed up"
        assert shown["state"] == "Running" and shown["steps_from"] == "task runs" and shown["end"] is None
        listed = lmflow_cmd("runs", name).stdout.splitlines()[2].split()
        assert listed[1] == "Running" and listed[4].endswith("…")  # a duration still growing

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # stopped properly: its summary says which step it stopped in, and which never started
    ended, _ = run_json("runs", "show", name)
    assert ended["steps_from"] == "summary"
    assert [(r["step"], r["status"], r["result"]) for r in ended["steps"]] == [
        ("quick", "completed", "1"), ("wait", "interrupted", "the flow stopped while it ran"),
        ("last", "skipped", "the flow stopped before it started")]


def test_without_a_prefect_server_the_commands_say_how_to_start_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    home = tmp_path / "home"
    for args in (["runs"], ["runs", "show", "some-run"], ["rerun", "some-run"]):
        out = lmflow_cmd(*args, env={"LMFLOW_HOME": str(home)})
        assert out.returncode == 3, out.stderr
        assert out.stderr.strip() == ("error: no Prefect server: start one with `lmflow server start` "
                                      "(or set PREFECT_API_URL to the one your runs use)")
    assert not (home / "prefect-server" / "server.json").exists()  # none was started
