"""Schedules, `lmflow serve`, `lmflow deploy` and `lmflow worker` against a real Prefect server.

Served and worker runs are real processes; every one is stopped by its process group. The stop
tests send one SIGTERM to the process, or one SIGINT to its process group (what Ctrl-C in a
terminal does), while a run is in progress.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import BIN, lmflow_cmd, wait_for

from lmflow.errors import SpecError
from lmflow.spec import load_spec

TINY = """\
version: 1
name: {name}
params: {{word: hello}}
defaults: {{cache: false}}
{schedule}
steps:
  - id: write
    python: {{function: "deploy_helpers:write", args: {{word: "${{{{ params.word }}}}"}}}}
"""

#: a run that is still in progress when the test stops what runs it
NAPPING = """\
version: 1
name: {name}
defaults: {{cache: false}}
steps:
  - id: nap
    python: {{function: "deploy_helpers:nap", args: {{seconds: 300}}}}
"""

HELPERS = """\
import time


def write(word):
    with open("written.txt", "a") as out:  # relative: the spec's folder is the working directory
        out.write(word + "\\n")
    return word


def nap(seconds):
    open("napping.txt", "w").close()
    time.sleep(seconds)
"""

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def make_spec(folder: Path, name: str, schedule: str = "", template: str = TINY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "deploy_helpers.py").write_text(HELPERS)
    path = folder / f"{name}.yaml"
    path.write_text(template.format(name=name, schedule=schedule))
    return path


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit_all(repo: Path) -> str:
    """`repo` made a git repository with everything in it committed; the commit."""
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "spec")
    return git(repo, "rev-parse", "HEAD")


def api(prefect_api: str, path: str, body: dict | None = None) -> object:
    """POST to the Prefect API; a 503 (its SQLite busy under a loaded box, seen once) is tried again."""
    for _ in range(5):
        answer = httpx.post(f"{prefect_api}{path}", json=body or {}, timeout=30)
        if answer.status_code != 503:
            break
        time.sleep(1)
    answer.raise_for_status()
    return answer.json()


def runs_of(prefect_api: str, name: str) -> list[dict]:
    return api(prefect_api, "/flow_runs/filter", {  # type: ignore[return-value]
        "flow_runs": {"tags": {"all_": [f"spec:{name}"]}}, "sort": "START_TIME_DESC"})


def flow_run(prefect_api: str, run_id: str) -> dict:
    return httpx.get(f"{prefect_api}/flow_runs/{run_id}", timeout=30).json()


def start(command: list[str], prefect_api: str, cwd: Path, stderr: Path) -> subprocess.Popen:
    """`lmflow serve`/`worker` in a session of its own, its stderr to a file (a pipe nobody reads
    while it runs could fill up and block it)."""
    with open(stderr, "w") as err:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd,
                                env={**os.environ, "PREFECT_API_URL": prefect_api}, start_new_session=True)


def interrupt(proc: subprocess.Popen, how: str) -> None:
    """One SIGTERM to the process, or one SIGINT to its process group (Ctrl-C in a terminal)."""
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)


def stop(proc: subprocess.Popen) -> str:
    """Stop a `serve`/worker process group; what it wrote to a piped stderr (the pipe is closed)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stderr is None or proc.stderr.closed:  # none, or read by communicate()
        return ""
    with proc.stderr:
        return proc.stderr.read()


# ---------------------------------------------------------------- schedules in the spec

def test_schedules_are_read_with_their_params(tmp_path: Path) -> None:
    spec = load_spec(make_spec(tmp_path, "sched", textwrap.dedent("""\
        schedule:
          - {cron: "0 6 * * 1-5", timezone: Europe/Berlin, params: {word: weekday}}
          - {interval: 15m, active: false}
        """)))
    first, second = spec.schedules
    assert (first.cron, first.timezone, first.params) == ("0 6 * * 1-5", "Europe/Berlin", {"word": "weekday"})
    assert (second.interval, second.active) == (900.0, False)
    assert first.describe() == "cron '0 6 * * 1-5' (Europe/Berlin) word='weekday'"


def test_bad_schedules_say_where_and_how(tmp_path: Path) -> None:
    path = make_spec(tmp_path, "bad", textwrap.dedent("""\
        schedule:
          - {cron: "0 6 * *", timezone: Mars/Olympus, params: {wrod: x}}
          - {cron: "* * * * *", interval: 1h}
        """))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert ("schedule[0].cron: a cron line has 5 fields (minute hour day month weekday), "
            "this one has 4") in text
    assert "schedule[0].timezone: unknown time zone 'Mars/Olympus'" in text
    assert "schedule[0].params.wrod: unknown parameter 'wrod' (did you mean 'word'?)" in text
    assert "schedule[1]: a schedule needs exactly one of cron or interval" in text


def test_a_bad_schedule_on_the_command_line_is_a_usage_error(tmp_path: Path) -> None:
    out = lmflow_cmd("serve", str(make_spec(tmp_path, "cli")), "--cron", "61 * *")
    assert out.returncode == 2
    assert "--cron a cron line has 5 fields" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- the lines serve and worker print

@dataclass(frozen=True)
class Report:
    """A run started or ended, as lmflow.prefect.serving.RunReport gives it."""

    state: str
    name: str
    message: str = ""
    scheduled: datetime | None = None
    seconds: float | None = None
    ended: bool = False
    spec: str = "nightly"
    url: str = "http://127.0.0.1:4200/runs/flow-run/0193"


def test_the_lines_serve_and_worker_print() -> None:
    from lmflow.render import serving as lines

    now = datetime(2026, 12, 7, 12, 0, 14)
    tick = datetime(2026, 12, 7, 12, 0, 0).astimezone()
    assert lines.run_line(Report("Running", "witty-lemur", scheduled=tick), now) == (
        "12:00:14 Running nightly run witty-lemur (scheduled for 12:00:00)  http://127.0.0.1:4200/runs/flow-run/0193")
    ended = Report("Completed", "nightly-20261207T120002Z-42", seconds=72.4, ended=True)
    assert lines.run_line(ended, now) == (
        "12:00:14 Completed nightly run nightly-20261207T120002Z-42 after 1m12s  "
        "http://127.0.0.1:4200/runs/flow-run/0193")
    assert lines.run_line(Report("Cancelled", "nightly-1", message="Flow run was cancelled.\nmore", seconds=3,
                                 ended=True), now) == (
        "12:00:14 Cancelled nightly run nightly-1 after 3s: Flow run was cancelled.  "
        "http://127.0.0.1:4200/runs/flow-run/0193")
    assert lines.stopping("SIGINT", 2, now) == "12:00:14 stopping (SIGINT): cancelling 2 runs in progress"
    assert lines.stopping("SIGTERM", 0, now) == "12:00:14 stopping (SIGTERM): no run in progress"
    assert lines.stopped(now) == "12:00:14 stopped"


# ---------------------------------------------------------------- serve

def test_served_runs_complete_on_their_interval(prefect_api: str, tmp_path: Path) -> None:
    spec = make_spec(tmp_path / "served", "served-every-2s")
    proc = start([str(BIN / "lmflow"), "serve", str(spec), "--interval", "2s"], prefect_api, tmp_path,
                 tmp_path / "stderr.txt")
    try:
        def two_completed() -> list[dict] | None:
            completed = [r for r in runs_of(prefect_api, "served-every-2s") if r["state_type"] == "COMPLETED"]
            return completed if len(completed) >= 2 else None

        done = wait_for(two_completed, timeout=120, interval=1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)  # a guard against a hang, not a measure of speed
    finally:
        stop(proc)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert done and len(done) >= 2, stderr
    assert proc.returncode == 0, stderr
    assert "serving served-every-2s: every 2s" in stderr
    run = done[0]
    assert run["name"].startswith("served-every-2s-")  # the run's id, not a random name
    assert {"lmflow", "spec:served-every-2s"} <= set(run["tags"])
    assert any(t.startswith("sha256:") for t in run["tags"])
    assert run["parameters"]["spec_path"] == str(spec.resolve())
    # python code ran in the spec's folder, not in the folder serve was started from
    assert (spec.parent / "written.txt").read_text().count("hello") >= 2
    assert not (tmp_path / "written.txt").exists()
    # a line when each run starts (a schedule's tick) and when it ends, with its page in the UI
    for finished in done:
        page = f"/runs/flow-run/{finished['id']}"
        assert re.search(rf"\d\d:\d\d:\d\d Running served-every-2s run \S+ \(scheduled for "
                         rf"\d\d:\d\d:\d\d\)  http://127\.0\.0\.1:\d+{page}\n", stderr), stderr
        assert re.search(rf"Completed served-every-2s run {finished['name']} after \d+s  http://\S+{page}\n",
                         stderr), stderr
    assert "stopping (SIGTERM)" in stderr and stderr.endswith(" stopped\n"), stderr
    assert "Warning" not in stderr and "Traceback" not in stderr, stderr
    assert not [r for r in runs_of(prefect_api, "served-every-2s") if r["state_type"] not in FINAL]


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_one_signal_stops_serve_and_cancels_the_run_in_progress(prefect_api: str, tmp_path: Path,
                                                                 how: str) -> None:
    name = f"served-nap-{how.lower()}"
    spec = make_spec(tmp_path / "served", name, template=NAPPING)
    proc = start([str(BIN / "lmflow"), "serve", str(spec)], prefect_api, tmp_path, tmp_path / "stderr.txt")
    try:
        deployment = wait_for(lambda: deployment_named(prefect_api, name), timeout=120, interval=0.5)
        assert deployment, (tmp_path / "stderr.txt").read_text()
        run = api(prefect_api, f"/deployments/{deployment['id']}/create_flow_run", {})
        assert wait_for((spec.parent / "napping.txt").exists, timeout=120, interval=0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        interrupt(proc, how)
        proc.wait(timeout=60)  # a guard against a hang, not a measure of speed
    finally:
        stop(proc)
    assert_stopped_cleanly(prefect_api, proc, name, run["id"], children,  # type: ignore[index]
                           (tmp_path / "stderr.txt").read_text(), how)


def deployment_named(prefect_api: str, name: str) -> dict | None:
    answer = httpx.get(f"{prefect_api}/deployments/name/{name}/{name}", timeout=30)
    return answer.json() if answer.status_code == 200 else None


def assert_stopped_cleanly(prefect_api: str, proc: subprocess.Popen, name: str, run_id: str,
                           children: list[psutil.Process], stderr: str, how: str) -> None:
    """Exit 0 after its stop lines; the run Cancelled, none of the spec's runs left unfinished; no
    process of its own left; no warning."""
    assert proc.returncode == 0, stderr
    assert f"stopping ({'SIGTERM' if how == 'SIGTERM' else 'SIGINT'}): cancelling 1 run in progress" in stderr
    page = f"/runs/flow-run/{run_id}"
    assert re.search(rf"Running {name} run \S+  http://127\.0\.0\.1:\d+{page}\n", stderr), stderr
    assert re.search(rf"Cancelled {name} run {name}-\S+ after \d+s: .*{page}\n", stderr), stderr
    assert stderr.endswith(" stopped\n"), stderr
    assert "Warning" not in stderr and "Traceback" not in stderr, stderr
    assert flow_run(prefect_api, run_id)["state_type"] == "CANCELLED"
    assert [r["state_type"] for r in runs_of(prefect_api, name) if r["state_type"] not in FINAL] == []
    assert children  # the run's process (and whatever it started)
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []


# ---------------------------------------------------------------- deploy + worker

def test_deploy_registers_the_cron_schedule_and_a_worker_runs_it_from_its_checkout(
        prefect_api: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    spec = make_spec(repo / "specs", "pooled", textwrap.dedent("""\
        schedule: {cron: "0 6 * * 1-5", timezone: Europe/Berlin, params: {word: weekday}}
        """))
    commit = commit_all(repo)
    env = {"PREFECT_API_URL": prefect_api}
    out = lmflow_cmd("deploy", str(spec), "--pool", "lmflow-test-pool", env=env)
    assert out.returncode == 0, out.stderr
    assert f"(specs/pooled.yaml at {commit[:12]}) on pool 'lmflow-test-pool'" in out.stdout
    deployment = httpx.get(f"{prefect_api}/deployments/name/pooled/pooled", timeout=30).json()
    assert deployment["parameters"] == {"spec_path": "specs/pooled.yaml"}
    assert deployment["work_pool_name"] == "lmflow-test-pool"
    [schedule] = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 6 * * 1-5"
    assert schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["parameters"] == {"params": {"word": "weekday"}}

    # a worker elsewhere: it finds the spec in its own checkout of the repository
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    command = [str(BIN / "lmflow"), "worker", "--pool", "lmflow-test-pool", "--repo", str(repo)]
    worker = start(command, prefect_api, elsewhere, tmp_path / "stderr.txt")
    try:
        run = api(prefect_api, f"/deployments/{deployment['id']}/create_flow_run",
                  {"parameters": {"spec_path": "specs/pooled.yaml", "params": {"word": "now"}}})
        def final() -> dict | None:
            state = httpx.get(f"{prefect_api}/flow_runs/{run['id']}", timeout=30).json()  # type: ignore[index]
            return state if state["state_type"] in ("COMPLETED", "FAILED", "CRASHED") else None

        finished = wait_for(final, timeout=180, interval=1)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)  # a guard against a hang, not a measure of speed
    finally:
        stop(worker)
    assert finished and finished["state_type"] == "COMPLETED", finished
    assert f"commit:{commit[:12]}" in finished["tags"]
    assert (spec.parent / "written.txt").read_text() == "now\n"
    assert not (elsewhere / "written.txt").exists()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert worker.returncode == 0, stderr
    assert f"worker for pool 'lmflow-test-pool': specs from {repo}" in stderr
    page = f"/runs/flow-run/{run['id']}"  # type: ignore[index]
    assert re.search(rf"\d\d:\d\d:\d\d Running pooled run \S+  http://127\.0\.0\.1:\d+{page}\n",
                     stderr), stderr
    assert re.search(rf"Completed pooled run {finished['name']} after \d+s  http://\S+{page}\n",
                     stderr), stderr
    assert "stopping (SIGTERM): no run in progress" in stderr and stderr.endswith(" stopped\n"), stderr
    assert "Warning" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_one_signal_stops_a_worker_and_cancels_the_run_in_progress(prefect_api: str, tmp_path: Path,
                                                                    how: str) -> None:
    repo = tmp_path / "repo"
    name = f"pooled-nap-{how.lower()}"
    spec = make_spec(repo / "specs", name, template=NAPPING)
    commit_all(repo)
    pool = f"lmflow-stop-{how.lower()}"  # a pool of its own: no other test's worker takes the run
    out = lmflow_cmd("deploy", str(spec), "--pool", pool, env={"PREFECT_API_URL": prefect_api})
    assert out.returncode == 0, out.stderr
    deployment = deployment_named(prefect_api, name)
    assert deployment
    worker = start([str(BIN / "lmflow"), "worker", "--pool", pool, "--repo", str(repo)], prefect_api,
                   tmp_path, tmp_path / "stderr.txt")
    try:
        run = api(prefect_api, f"/deployments/{deployment['id']}/create_flow_run", {})
        assert wait_for((spec.parent / "napping.txt").exists, timeout=180, interval=0.2)
        children = psutil.Process(worker.pid).children(recursive=True)
        interrupt(worker, how)
        worker.wait(timeout=60)  # a guard against a hang, not a measure of speed
    finally:
        stop(worker)
    assert_stopped_cleanly(prefect_api, worker, name, run["id"], children,  # type: ignore[index]
                           (tmp_path / "stderr.txt").read_text(), how)


def test_deploy_refuses_a_spec_that_is_not_committed(prefect_api: str, tmp_path: Path) -> None:
    out = lmflow_cmd("deploy", str(make_spec(tmp_path, "loose")), "--pool", "p",
                     env={"PREFECT_API_URL": prefect_api})
    assert out.returncode == 2
    assert "is not committed in a git repository" in out.stderr
    assert "use `lmflow serve`" in out.stderr


def committed_repo(root: Path, name: str) -> tuple[Path, Path]:
    """A git repository at `root` with a spec `name` committed under specs/; the spec's path."""
    spec = make_spec(root / "specs", name)
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "t")
    git(root, "add", ".")
    git(root, "commit", "-qm", "spec")
    return root, spec


def test_deploy_says_what_workers_will_not_see(prefect_api: str, tmp_path: Path) -> None:
    """Local edits next to the spec, and a commit no remote has: deployed all the same (the
    committed version is what runs), with a warning that names them."""
    repo, spec = committed_repo(tmp_path / "repo", "edited")
    commit = git(repo, "rev-parse", "HEAD")[:12]
    env = {"PREFECT_API_URL": prefect_api}
    clean = lmflow_cmd("deploy", str(spec), "--pool", "lmflow-test-pool", env=env)
    assert clean.returncode == 0, clean.stderr
    assert "warning" not in clean.stderr  # no remote at all: nothing to push to

    spec.write_text(spec.read_text().replace("word: hello", "word: edited"))
    (spec.parent / "prompt.txt").write_text("new\n")
    git(tmp_path, "init", "-q", "--bare", "origin.git")
    git(repo, "remote", "add", "origin", str(tmp_path / "origin.git"))
    out = lmflow_cmd("deploy", str(spec), "--pool", "lmflow-test-pool", env=env)
    assert out.returncode == 0, out.stderr
    assert (f"warning: specs/edited.yaml: the working copy differs from commit {commit} "
            "(specs/edited.yaml, specs/prompt.txt): workers run the committed version; commit the "
            "changes to deploy them") in out.stderr
    assert (f"warning: specs/edited.yaml: commit {commit} is on no remote branch: workers on other "
            "machines cannot check it out; push it") in out.stderr

    git(repo, "add", ".")
    git(repo, "commit", "-qm", "edits")
    git(repo, "push", "-q", "origin", "HEAD:main")
    pushed = lmflow_cmd("deploy", str(spec), "--pool", "lmflow-test-pool", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert "warning" not in pushed.stderr


def test_serve_and_deploy_of_one_spec_say_they_share_its_deployment(prefect_api: str, tmp_path: Path) -> None:
    repo, spec = committed_repo(tmp_path / "repo", "shared")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    serving = subprocess.Popen([str(BIN / "lmflow"), "serve", str(spec)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                               start_new_session=True)
    try:
        made = wait_for(lambda: httpx.get(f"{prefect_api}/deployments/name/shared/shared",
                                          timeout=30).status_code == 200, timeout=120, interval=1)
    finally:
        served = stop(serving)
    assert made, served
    assert "warning" not in served  # the first of the two says nothing

    deployed = lmflow_cmd("deploy", str(spec), "--pool", "lmflow-test-pool", env=env)
    assert deployed.returncode == 0, deployed.stderr
    assert ("warning: specs/shared.yaml: deployment shared/shared is also the one `lmflow serve` of "
            "this spec uses (one deployment per spec name): it now runs on pool 'lmflow-test-pool'; a serve "
            "of it still running takes its runs too and pauses it when it stops: stop that serve, then "
            "deploy again") in deployed.stderr
    deployment = httpx.get(f"{prefect_api}/deployments/name/shared/shared", timeout=30).json()
    assert deployment["work_pool_name"] == "lmflow-test-pool"
    assert deployment["paused"] is False  # the stopped serve had paused it

    def updated() -> str:
        return httpx.get(f"{prefect_api}/deployments/name/shared/shared", timeout=30).json()["updated"]

    deployed_at = updated()
    again = subprocess.Popen([str(BIN / "lmflow"), "serve", str(spec)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                             start_new_session=True)
    try:  # (the serve warns before it takes the deployment over)
        assert wait_for(lambda: updated() != deployed_at, timeout=120, interval=1)
    finally:
        served = stop(again)
    assert ("warning: deployment shared/shared is also the one `lmflow deploy` put on pool "
            "'lmflow-test-pool' (one deployment per spec name): this serve and that pool's workers both "
            "take its runs, and when this serve stops Prefect pauses it: `lmflow deploy` it again to "
            "resume it on the pool") in served
    deployment = httpx.get(f"{prefect_api}/deployments/name/shared/shared", timeout=30).json()
    assert deployment["work_pool_name"] == "lmflow-test-pool" and deployment["paused"] is True
    assert lmflow_cmd("deploy", str(spec), "--pool", "lmflow-test-pool", env=env).returncode == 0
    assert httpx.get(f"{prefect_api}/deployments/name/shared/shared", timeout=30).json()["paused"] is False
