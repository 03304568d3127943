"""The Prefect server `lmflow run` starts in the background when none runs: started once and
announced once, found by later runs, stopped by `lmflow server stop` or after an idle period.

Real `lmflow` processes and real Prefect servers, each test in an lmflow home of its own (the
session's server, which the other tests share, lives in the session's home and is left alone).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import BIN, ROOT, lmflow_cmd, wait_for

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

ANNOUNCED = "lmflow: starting a Prefect server in the background"


def write_spec(folder: Path, name: str = "tiny", seconds: float = 0) -> Path:
    (folder / "naps.py").write_text("import time\n\n\ndef nap(seconds):\n    time.sleep(seconds)\n"
                                    "    return seconds\n")
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        name: {name}
        defaults: {{cache: false}}
        steps:
          - id: nap
            python: {{function: "naps:nap", args: {{seconds: {seconds}}}}}
    """))
    return path


def processes_of(home: Path) -> list[psutil.Process]:
    """Every live process started for the lmflow home `home` (watchdogs, Prefect servers)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if (proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid()
                    and proc.environ().get("LMFLOW_HOME") == str(home)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def servers_of(home: Path) -> list[psutil.Process]:
    return [p for p in processes_of(home) if "server" in p.info["cmdline"] and "prefect" in p.info["cmdline"]]


def state_of(home: Path) -> dict | None:
    path = home / "prefect-server" / "server.json"
    return json.loads(path.read_text()) if path.exists() else None


def gone(pids: list[int]) -> bool:
    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(dead(pid) for pid in pids)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An lmflow home of its own, no PREFECT_API_URL, the defaults of every setting but the port
    (never 4200: a user's server may be there). Every process started for it is stopped by PID."""
    from lmflow.backends.local import free_port

    lmflow_home = tmp_path / "lmflow"
    monkeypatch.setenv("LMFLOW_HOME", str(lmflow_home))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    monkeypatch.setenv("LMFLOW_PREFECT_SERVER_PORT", str(free_port()))
    for name in ("PREFECT_API_URL", "LMFLOW_PREFECT_SERVER", "LMFLOW_PREFECT_SERVER_IDLE"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield lmflow_home
    finally:
        lmflow_cmd("server", "stop", timeout=60)
        for proc in processes_of(lmflow_home):
            proc.kill()


def test_first_run_starts_the_server_later_runs_use_it_and_stop_ends_it(home: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    first = lmflow_cmd("run", str(spec))
    assert first.returncode == 0, first.stderr
    state = state_of(home)
    assert state and state["started_by"] == "lmflow run" and state["idle_stop"] == 3600
    ui = state["url"].removesuffix("/api")
    announced = [line for line in first.stderr.splitlines() if line.startswith(ANNOUNCED)]
    assert announced == [
        f"{ANNOUNCED}, UI at {ui}; it keeps running for later runs until 1h without runs or "
        "`lmflow server stop` (LMFLOW_PREFECT_SERVER=temporary: a temporary server per run instead)"]
    assert f"on Prefect server {state['url']}" in first.stderr

    second = lmflow_cmd("run", str(spec))
    assert second.returncode == 0, second.stderr
    assert ANNOUNCED not in second.stderr
    assert f"on Prefect server {state['url']}" in second.stderr
    assert state_of(home)["pid"] == state["pid"]
    runs = httpx.post(f"{state['url']}/flow_runs/filter", json={}, timeout=30).json()
    assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "COMPLETED"]  # one history

    status = lmflow_cmd("server", "status")
    assert status.returncode == 0
    assert f"running: {ui} (pid {state['pid']}" in status.stdout
    assert ("started by `lmflow run`, in the background; stops by itself after 1h without flow runs: at "
            in status.stdout)

    kept = lmflow_cmd("server", "start")  # an explicit start keeps the server `lmflow run` started
    assert kept.returncode == 0, kept.stderr
    assert f"Prefect server already running: {ui} (pid {state['pid']}" in kept.stdout
    assert state_of(home)["idle_stop"] is None
    assert "runs until `lmflow server stop`" in lmflow_cmd("server", "status").stdout

    pids = [p.pid for p in processes_of(home)]
    assert len(pids) == 2  # the watchdog and its Prefect server
    stopped = lmflow_cmd("server", "stop")
    assert stopped.stdout.strip() == f"stopped Prefect server (pid {state['pid']})"
    assert wait_for(lambda: gone(pids), timeout=60)
    assert state_of(home) is None
    assert list((home / "pids").glob("*.json")) == []


def test_the_temporary_setting_leaves_no_server_behind(home: Path, tmp_path: Path) -> None:
    out = lmflow_cmd("run", str(write_spec(tmp_path)), env={"LMFLOW_PREFECT_SERVER": "temporary"})
    assert out.returncode == 0, out.stderr
    assert "starting a temporary Prefect server for this run" in out.stderr
    assert ANNOUNCED not in out.stderr
    assert state_of(home) is None
    assert wait_for(lambda: not processes_of(home), timeout=60)
    assert list((home / "pids").glob("*.json")) == []
    status = lmflow_cmd("server", "status", env={"LMFLOW_PREFECT_SERVER": "temporary"})
    assert status.returncode == 1
    assert "lmflow run uses: a temporary Prefect server per run (LMFLOW_PREFECT_SERVER=temporary)" \
        in status.stdout


def test_two_first_runs_at_once_start_one_server(home: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    procs = [subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
             for _ in range(2)]
    try:
        outs = [proc.communicate(timeout=180) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outs]
    assert sum(ANNOUNCED in err for _, err in outs) == 1
    state = state_of(home)
    assert all(f"on Prefect server {state['url']}" in err for _, err in outs)
    assert len(servers_of(home)) == 1
    assert len(httpx.post(f"{state['url']}/flow_runs/filter", json={}, timeout=30).json()) == 2


def test_an_idle_server_stops_itself_but_not_under_a_run(home: Path, tmp_path: Path) -> None:
    """Not while a run is in progress; but a SIGKILLed run, whose flow run stays "Running" in
    Prefect for good, does not keep it up."""
    env = {**os.environ, "LMFLOW_PREFECT_SERVER_IDLE": "3s"}
    spec = write_spec(tmp_path, seconds=120)
    run = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, text=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        journals = home / "runs"
        assert wait_for(lambda: any('"running"' in p.read_text() for p in journals.glob("*.jsonl")),
                        timeout=120), "the run never started its step"
        state = state_of(home)
        assert state and state["idle_stop"] == 3
        pids = [p.pid for p in processes_of(home) if p.pid != run.pid]
        time.sleep(6)  # twice the idle period, with the run in progress
        assert httpx.get(f"{state['url']}/health", timeout=10).status_code == 200
        run.kill()
        run.wait(10)
        flow_runs = httpx.post(f"{state['url']}/flow_runs/filter", json={}, timeout=30).json()
        assert [r["state_type"] for r in flow_runs] == ["RUNNING"]  # for good: nobody will end it
    finally:
        if run.poll() is None:
            run.kill()
        run.wait(10)
    with run.stderr:
        assert "until 3s without runs or `lmflow server stop`" in run.stderr.read()
    assert wait_for(lambda: gone(pids), timeout=60), "the idle server did not stop"
    assert state_of(home) is None
    assert "no flow runs for 3s: stopping the Prefect server" in Path(state["log"]).read_text()
    assert lmflow_cmd("server", "status").returncode == 1
    assert list((home / "pids").glob("*.json")) == []


def test_a_server_whose_home_is_deleted_stops_and_leaves_the_home_deleted(home: Path) -> None:
    """A server of a temporary home (tests, scripts) does not run on for an hour once the home is
    gone, even one started by `lmflow server start`, which has no idle stop."""
    started = lmflow_cmd("server", "start")
    assert started.returncode == 0, started.stderr
    assert state_of(home)["idle_stop"] is None
    pids = [p.pid for p in processes_of(home)]
    assert len(pids) == 2  # the watchdog and its Prefect server
    shutil.rmtree(home)
    assert wait_for(lambda: gone(pids), timeout=60), "the server of a deleted home kept running"
    assert not home.exists()  # stopping it made nothing anew there


@pytest.mark.parametrize(("name", "value", "message"), [
    ("LMFLOW_PREFECT_SERVER", "sometimes", "error: LMFLOW_PREFECT_SERVER='sometimes' is not a choice: set it "
     "to `background` (the default: one server for every run) or `temporary` (one per run)"),
    ("LMFLOW_PREFECT_SERVER_IDLE", "soon", "error: LMFLOW_PREFECT_SERVER_IDLE='soon' is not a duration: use "
     "e.g. 1h, 30m, 90s, or 0 for never"),
])
def test_a_wrong_setting_is_an_error_and_starts_nothing(home: Path, tmp_path: Path, name: str, value: str,
                                                        message: str) -> None:
    out = lmflow_cmd("run", str(write_spec(tmp_path)), env={name: value})
    assert out.returncode == 3
    assert out.stderr.strip() == message
    assert state_of(home) is None and not processes_of(home)


def test_a_wrong_spec_starts_no_server(home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("version: 1\nname: bad\nsteps: []\n")
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 2
    assert ANNOUNCED not in out.stderr
    assert state_of(home) is None and not processes_of(home)


FAKE = """\
import http.server, sys
class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Healthy)
print("ready", flush=True)
server.serve_forever()
"""


def test_start_accepts_only_the_server_it_started(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port was free when checked and another process took it before our server bound it: the
    other's healthy answer is not taken for ours, and the server starts on a free port instead."""
    from lmflow.prefect import server as prefect_server

    port = int(os.environ["LMFLOW_PREFECT_SERVER_PORT"])
    fake = subprocess.Popen([sys.executable, "-c", FAKE, str(port)], stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert fake.stdout.readline().strip() == "ready"
        assert httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
        assert prefect_server._listens(fake.pid, port) and not prefect_server._listens(other.pid, port)
        checked = []
        port_free = prefect_server._port_free

        def free_when_checked(candidate: int) -> bool:  # the check happens before the other binds
            if candidate == port and not checked:
                checked.append(candidate)
                return True
            return port_free(candidate)

        monkeypatch.setattr(prefect_server, "_port_free", free_when_checked)
        state = prefect_server.start(idle_stop=60.0, started_by=prefect_server.STARTED_BY_RUN)
        try:
            assert checked == [port]
            assert state.url != f"http://127.0.0.1:{port}/api"
            ours = int(state.url.removesuffix("/api").rsplit(":", 1)[1])
            assert prefect_server._listens(state.pid, ours)
            assert prefect_server.read_state() == state
        finally:
            assert prefect_server.stop() == state
    finally:
        for proc in (fake, other):
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        fake.stdout.close()


def test_a_prefect_server_that_dies_mid_run_is_restarted_and_the_run_goes_on(
        home: Path, tmp_path: Path) -> None:
    (tmp_path / "naps.py").write_text("import time\n\n\ndef nap(x):\n    time.sleep(0.2)\n    return x\n")
    spec = tmp_path / "dies.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: dies
        defaults: {cache: false}
        steps:
          - id: nap
            foreach: ${{ params.xs }}
            parallel: 2
            python: {function: "naps:nap", args: {x: "${{ item }}"}}
          - id: after
            python: {function: "naps:nap", args: {x: "${{ steps.nap.output }}"}}
        """) + f"params: {{xs: {list(range(60))}}}\n")
    run = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec), "--json"], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        journals = home / "runs"
        assert wait_for(lambda: any(p.read_text().count('"item":') >= 12 for p in journals.glob("*.jsonl")),
                        timeout=120), "the map never got going"
        watchdog = state_of(home)["pid"]
        (server,) = servers_of(home)
        server.kill()  # the Prefect server dies in the middle of the map
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    steps = {s["id"]: s for s in json.loads(out)["steps"]}
    assert steps["nap"]["output"] == list(range(60))  # every item, once, in order
    assert steps["after"]["output"] == list(range(60))
    state = state_of(home)
    assert state["pid"] == watchdog  # the same watchdog restarted its server
    assert "the Prefect server exited with code -9: restarting it" in Path(state["log"]).read_text()
    assert lmflow_cmd("server", "status").returncode == 0
    runs = httpx.post(f"{state['url']}/flow_runs/filter", json={}, timeout=30).json()
    assert wait_for(lambda: [r["state_type"] for r in httpx.post(
        f"{state['url']}/flow_runs/filter", json={}, timeout=30).json()] == ["COMPLETED"], timeout=60), runs


def test_a_damaged_state_file_does_not_start_a_second_server(home: Path, tmp_path: Path) -> None:
    assert lmflow_cmd("server", "start").returncode == 0
    state = state_of(home)
    path = home / "prefect-server" / "server.json"
    path.write_text(path.read_text()[:20])  # truncated
    again = lmflow_cmd("server", "start")
    assert again.returncode == 0, again.stderr
    assert f"Prefect server already running: {state['url'].removesuffix('/api')} (pid {state['pid']}" \
        in again.stdout
    assert f"{path} cannot be read (JSONDecodeError); the Prefect server it named still runs" in again.stderr
    assert state_of(home) == state  # written again, whole
    assert len(servers_of(home)) == 1
    assert lmflow_cmd("run", str(write_spec(tmp_path))).returncode == 0
    assert len(servers_of(home)) == 1
