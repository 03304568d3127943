"""What steps and map items share when they run in worker threads: breakers, the response cache,
imports of the spec's modules, user code with a timeout, child processes and server restarts.

Races are made likely, not waited for: threads start together at a barrier, and the interpreter
switches threads every microsecond (`busy_switching`) instead of every 5 ms.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, wait_for

from lmflow import processes
from lmflow.backends.supervisor import ServerDown, Supervisor
from lmflow.cache import MISSING, ResponseCache
from lmflow.errors import BackendUnreachable
from lmflow.resilience import BreakerBoard, ResourceGuard
from lmflow.spec.model import Breaker, Guard, ServerConfig
from lmflow.steps.python import (
    UserCodeFailed,
    UserCodeTimeout,
    _UserThreads,
    call_function,
    load_function,
)


@pytest.fixture
def busy_switching() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(0..count-1) in `count` threads released at once; their results in order
    (an exception in any thread is raised here)."""
    barrier = threading.Barrier(count)

    def run(index: int) -> Any:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


# ---------------------------------------------------------------- breaker


def test_breaker_counts_every_failure_from_16_threads(busy_switching: None) -> None:
    board = BreakerBoard(Breaker(failures=10_000, cooldown=30))

    def fail(index: int) -> None:
        for _ in range(50):
            board.failure("server a")
            board.failure(f"model {index % 4}")

    together(16, fail)
    assert board.states["server a"].failures == 16 * 50
    assert [board.states[f"model {i}"].failures for i in range(4)] == [4 * 50] * 4
    assert board.open_reason("server a") is None  # 800 < 10_000: still closed


def test_half_open_lets_one_of_8_concurrent_callers_test_it(busy_switching: None) -> None:
    now = [0.0]
    board = BreakerBoard(Breaker(failures=2, cooldown=10), clock=lambda: now[0])
    board.failure("m")
    board.failure("m")
    assert "circuit open after 2 consecutive failures" in board.open_reason("m")
    now[0] = 10.5  # the cool-down is over

    reasons = together(8, lambda index: board.open_reason("m"))
    assert reasons.count(None) == 1
    tester = reasons.index(None)
    assert all("another call is testing it" in r for i, r in enumerate(reasons) if i != tester)
    # this thread is not the tester: still skipped, and its release cannot end another's test
    board.release("m")
    assert "another call is testing it" in board.open_reason("m")


def test_half_open_test_ends_with_its_verdict_or_release() -> None:
    now = [0.0]
    board = BreakerBoard(Breaker(failures=1, cooldown=10), clock=lambda: now[0])

    def in_thread(fn: Callable[[], Any]) -> Any:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(fn).result()

    board.failure("m")
    now[0] = 11.0
    assert board.open_reason("m") is None  # this thread tests it
    assert board.open_reason("m") is None  # and may ask again
    assert "another call is testing it" in in_thread(lambda: board.open_reason("m"))
    board.release("m")  # no verdict (skipped for a guard, say): the next caller tests it
    assert in_thread(lambda: board.open_reason("m")) is None
    # that thread ended without a verdict and its test is still held: nobody else may test...
    assert "another call is testing it" in board.open_reason("m")
    board.success("m")  # ...until a success closes it for all
    assert board.open_reason("m") is None and in_thread(lambda: board.open_reason("m")) is None

    board.failure("m")
    now[0] = 22.0
    assert board.open_reason("m") is None
    board.failure("m")  # the test failed: open again for a full cool-down
    assert "circuit open after 2 consecutive failures" in in_thread(lambda: board.open_reason("m"))


def test_the_cpu_guard_measures_across_threads() -> None:
    """psutil.cpu_percent(interval=None) keeps its baseline per thread: from a fresh thread it
    says 100% idle. The guard's one baseline sees one core kept busy from another thread."""
    guard = ResourceGuard(Guard(min_cpu_idle=0.99))
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        stop.wait(0.5)  # a full measuring window with one core busy
        with ThreadPoolExecutor(1) as pool:
            short = pool.submit(guard.shortage).result()
    finally:
        stop.set()
        spinner.join()
    assert short is not None and short.startswith("idle CPU ")


# ---------------------------------------------------------------- response cache


def test_the_response_cache_from_8_threads_opens_once_and_counts_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy_switching: None
) -> None:
    import diskcache

    real = diskcache.Cache
    opened: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> Any:  # the real constructor, counted
        opened.append(args[0])
        time.sleep(0.01)  # let the other threads arrive while this one opens
        return real(*args, **kwargs)

    monkeypatch.setattr(diskcache, "Cache", spy)
    cache = ResponseCache(tmp_path / "c")

    def work(index: int) -> tuple[int, int]:
        gets = sets = 0
        for i in range(50):
            own = f"thread {index} item {i}"
            cache.set(own, {"output": [index, i]})
            assert cache.get(own) == {"output": [index, i]}
            shared = cache.get(f"shared {i % 5}")
            assert shared is MISSING or shared == {"output": i % 5}
            cache.set(f"shared {i % 5}", {"output": i % 5})
            gets, sets = gets + 2, sets + 2
        return gets, sets

    try:
        counts = together(8, work)
    finally:
        cache.close()
    gets, sets = sum(c[0] for c in counts), sum(c[1] for c in counts)
    assert opened == [str(tmp_path / "c")]
    assert cache.stats.hits + cache.stats.misses == gets == 8 * 100
    assert cache.stats.stores == sets == 8 * 100
    assert cache.stats.hits >= 8 * 50 and cache.stats.misses <= 8 * 50  # every own key was a hit
    assert len(cache.stats.hit_seconds) == cache.stats.hits
    assert cache.broken is None and cache.stats.errors == []


# ---------------------------------------------------------------- python steps


def test_imports_from_many_spec_folders_at_once_leave_sys_path_as_it_was(
    tmp_path: Path, busy_switching: None
) -> None:
    """8 spec folders, two threads each (the steps of one spec share its folder), 20 rounds of
    imports; each module imports a helper next to it, so its folder must be on sys.path
    for the whole import."""
    folders = []
    for k in range(8):
        folder = tmp_path / f"spec{k}"
        folder.mkdir()
        for r in range(20):
            for half in range(2):
                name = f"threads_s{k}_r{r}_h{half}"
                (folder / f"{name}_helper.py").write_text(f"VALUE = ({k}, {r}, {half})\n")
                (folder / f"{name}.py").write_text(
                    f"from {name}_helper import VALUE\n\n\ndef answer():\n    return VALUE\n")
        folders.append(folder)
    before = list(sys.path)

    def work(index: int) -> list[Any]:
        k, half = divmod(index, 2)
        answers = []
        for r in range(20):
            answers.append(load_function(f"threads_s{k}_r{r}_h{half}:answer", folders[k])())
        return answers

    try:
        results = together(16, work)
    finally:
        for name in [m for m in sys.modules if m.startswith("threads_s")]:
            del sys.modules[name]
    assert results == [[(i // 2, r, i % 2) for r in range(20)] for i in range(16)]
    assert sys.path == before


USER_CODE = """\
import threading
from contextvars import ContextVar

REQUEST = ContextVar("request", default=None)


def slow(release, returned=None):
    release.wait(60)  # until the test releases it (60 s: should a test hang)
    if returned is not None:
        returned.set()
    return "late"


def bad():
    raise ValueError("boom")


def fast(x):
    return {"double": x * 2, "thread": threading.current_thread().name, "request": REQUEST.get()}
"""


@pytest.fixture
def user_code(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "usercode_threads.py").write_text(USER_CODE)
    yield tmp_path
    sys.modules.pop("usercode_threads", None)


def test_user_code_past_its_timeout_raises_and_is_left_running(user_code: Path) -> None:
    release, returned = threading.Event(), threading.Event()
    try:
        with pytest.raises(UserCodeTimeout) as raised:
            call_function("usercode_threads:slow", {"release": release, "returned": returned}, user_code,
                          timeout=0.3)
        assert not returned.is_set()  # the call gave up on the function, which could not have returned yet
        worker = [t for t in threading.enumerate() if t.name == "lmflow python usercode_threads:slow"]
        assert len(worker) == 1 and worker[0].daemon and worker[0].is_alive()
    finally:
        release.set()
    # released, it returns and waits for the next call
    assert wait_for(lambda: worker[0].name == "lmflow python (idle)", timeout=60)
    assert returned.is_set()
    assert raised.value.retryable
    assert str(raised.value) == (
        "usercode_threads:slow did not return within 0.3s: raise the step's `timeout:` if it needs "
        "longer; it was left running in the background (Python cannot kill a thread)")


def test_user_code_with_a_timeout_returns_or_fails_as_without_one(
    user_code: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unhandled: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    line = USER_CODE.splitlines().index('    raise ValueError("boom")') + 1
    where = re.escape(f"boom at {user_code / 'usercode_threads.py'}:{line}")
    for timeout in (None, 5.0):
        with pytest.raises(UserCodeFailed, match=rf"^usercode_threads:bad raised ValueError: {where}$"):
            call_function("usercode_threads:bad", {}, user_code, timeout=timeout)
    assert unhandled == []  # raised once, in the caller, not also in the worker thread

    from usercode_threads import REQUEST  # type: ignore[import-not-found]

    token = REQUEST.set("r-1")
    try:
        inline = call_function("usercode_threads:fast", {"x": 21}, user_code)
        timed = call_function("usercode_threads:fast", {"x": 21}, user_code, timeout=5.0)
    finally:
        REQUEST.reset(token)
    assert inline == {"double": 42, "thread": threading.current_thread().name, "request": "r-1"}
    # its own thread, with the caller's context (Prefect's run context lives in contextvars)
    assert timed == {"double": 42, "thread": "lmflow python usercode_threads:fast", "request": "r-1"}


def test_user_code_threads_are_reused_and_a_hung_call_keeps_its_own() -> None:
    threads = _UserThreads(idle=60)  # no thread idles out between these calls, however busy the box
    ran: list[tuple[threading.Thread, str]] = []

    def job(then: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            ran.append((threading.current_thread(), threading.current_thread().name))
            then()
        return run

    for i in range(20):  # one after another: one thread serves them all
        threads.run(job(lambda: None), f"lmflow python n{i}")
        assert wait_for(lambda: threads._waiting, timeout=60)  # done, and back among the idle
    assert len({thread for thread, _ in ran}) == 1
    assert [name for _, name in ran] == [f"lmflow python n{i}" for i in range(20)]

    threads.idle = 0.3  # from here on, a thread left idle soon ends
    release, last = threading.Event(), threading.Event()
    threads.run(job(lambda: release.wait(60)), "lmflow python hung")
    assert wait_for(lambda: len(ran) == 21, timeout=60)
    threads.run(job(last.set), "lmflow python last")  # the hung thread is busy: another one answers
    try:
        assert last.wait(60)
        assert ran[-1][0] is not ran[-2][0] and ran[-2][0].name == "lmflow python hung"
    finally:
        release.set()
    used = {thread for thread, _ in ran}
    assert len(used) == 2
    assert wait_for(lambda: not any(t.is_alive() for t in used), timeout=60)  # idle threads end


def test_user_code_with_a_timeout_from_a_worker_thread(user_code: Path) -> None:
    release = threading.Event()

    def step(name: str) -> Any:
        kwargs = {"release": release} if name == "slow" else {"x": 2} if name == "fast" else {}
        try:
            return call_function(f"usercode_threads:{name}", kwargs, user_code, timeout=0.3)
        except (UserCodeTimeout, UserCodeFailed) as exc:
            return type(exc).__name__

    try:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(step, ["slow", "bad", "fast"]))
    finally:
        release.set()
    assert answers[:2] == ["UserCodeTimeout", "UserCodeFailed"]
    assert answers[2] == {"double": 4, "thread": "lmflow python usercode_threads:fast", "request": None}


# ---------------------------------------------------------------- child processes


def _task_gone(native_id: int) -> bool:
    return not Path(f"/proc/self/task/{native_id}").exists()


def test_a_child_spawned_from_a_worker_thread_outlives_that_thread(tmp_path: Path) -> None:
    spawned: list[subprocess.Popen] = []

    def step() -> None:
        spawned.append(processes.spawn([sys.executable, "-c", "import time; time.sleep(30)"],
                                       log_path=tmp_path / "child.log", label="test child"))

    worker = threading.Thread(target=step)
    worker.start()
    worker.join()
    try:
        record = processes._registry() / f"{spawned[0].pid}.json"
        assert wait_for(lambda: _task_gone(worker.native_id), timeout=60)  # the OS thread is gone too
        with pytest.raises(subprocess.TimeoutExpired):
            spawned[0].wait(1.0)  # PDEATHSIG bound to that thread would have killed it by now
        assert record.is_file() and not list(record.parent.glob(".*.partial"))
    finally:
        for proc in spawned:
            processes.stop(proc)
    assert spawned[0].returncode == -signal.SIGTERM  # it was alive until stop()
    assert not record.exists()


GRANDPARENT = """\
import sys
import threading
from pathlib import Path

from lmflow import processes

spawned = []
worker = threading.Thread(target=lambda: spawned.append(processes.spawn(
    [sys.executable, "-c", "import time; time.sleep(60)"], log_path=Path(sys.argv[1]),
    label="grandchild")))
worker.start()
worker.join()
print(spawned[0].pid, flush=True)
threading.Event().wait()
"""


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_grandchild_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(GRANDPARENT))
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "grandchild.log")],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "LMFLOW_HOME": str(tmp_path / "home")})
    grandchild = None
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        assert line.strip().isdigit(), line
        grandchild = int(line)
        assert not _dead(grandchild)  # alive although the thread that spawned it has ended
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_for(lambda: _dead(grandchild), timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if grandchild is not None and not _dead(grandchild):
            psutil.Process(grandchild).kill()


def test_a_child_runs_no_python_of_ours_between_fork_and_exec(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No preexec_fn (Python code in the forked copy of a multi-threaded lmflow); the program
    still gets the PID spawn returns (the wrapper execs it in its place)."""
    asked: list[dict[str, Any]] = []
    real = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> subprocess.Popen:
        asked.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    command = [sys.executable, "-c", "import time; time.sleep(30)"]
    child = processes.spawn(command, log_path=tmp_path / "child.log", label="test child")
    try:
        assert asked and all(kwargs.get("preexec_fn") is None for kwargs in asked)
        assert wait_for(lambda: psutil.Process(child.pid).cmdline() == command, timeout=60)
    finally:
        processes.stop(child)
    with pytest.raises(FileNotFoundError, match="no-such-program"):
        processes.spawn(["no-such-program", "--help"], log_path=tmp_path / "none.log", label="none")


# ---------------------------------------------------------------- supervisor


def flaky_server(tmp_path: Path, max_restarts: int, start_code: str) -> tuple[Supervisor, Path, Path]:
    """A "server" that is up once the marker file exists; its start command is a real process
    that logs each run and (given the right code) creates the marker."""
    marker, runs = tmp_path / "up", tmp_path / "runs"
    script = tmp_path / "start.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        from pathlib import Path
        with open({str(runs)!r}, "a") as runs:
            runs.write("run\\n")
        {start_code}
        """))
    config = ServerConfig(name="flaky", backend="openai", url="http://127.0.0.1:9",
                          start=f"{sys.executable} {script}", startup_timeout=20,
                          max_restarts=max_restarts)
    return Supervisor(config, health=marker.exists), marker, runs


def four_calls_to_a_dead_server(supervisor: Supervisor, marker: Path) -> list[Any]:
    """4 threads whose first calls all fail before any restart can happen."""
    all_failed = threading.Barrier(4)
    first = threading.local()

    def chat() -> str:
        up = marker.exists()
        if not getattr(first, "done", False):
            first.done = True
            all_failed.wait()
        if not up:
            raise BackendUnreachable("cannot reach http://127.0.0.1:9: connection reset", url="x")
        return "answer"

    def step(index: int) -> Any:
        try:
            return supervisor.call(chat)
        except (ServerDown, BackendUnreachable) as exc:
            return exc

    return together(4, step)


def test_four_threads_see_a_dead_server_and_one_restarts_it(tmp_path: Path, busy_switching: None) -> None:
    supervisor, marker, runs = flaky_server(tmp_path, 5, "Path(sys.argv[0]).with_name('up').touch()")
    events: list[tuple[str, str]] = []
    supervisor.listener = lambda event, data: events.append((event, data.get("message", "")))
    try:
        answers = four_calls_to_a_dead_server(supervisor, marker)
    finally:
        supervisor.close()
    assert answers == ["answer"] * 4
    assert runs.read_text() == "run\n"  # the start command ran once
    assert len(supervisor.restarts) == 1 and supervisor.restarts[0]["restart"] == 1
    assert [event for event, _ in events] == ["server_restarted", "warning", "warning"]
    assert "was down; restarted it with" in events[1][1]
    # the start command exited once the server was up, as a daemon's does, and no stop was given
    assert "running as a daemon, and it is still running: set server.stop" in events[2][1]


def test_a_failed_restart_is_not_repeated_for_the_same_crash(tmp_path: Path) -> None:
    supervisor, marker, runs = flaky_server(tmp_path, 5, "sys.exit(3)")
    try:
        answers = four_calls_to_a_dead_server(supervisor, marker)
    finally:
        supervisor.close()
    assert all(isinstance(a, ServerDown) for a in answers)
    assert all("restarting it failed: `" in str(a) and "exited with code 3" in str(a) for a in answers)
    assert runs.read_text() == "run\n"
    assert supervisor.restarts == []


def test_no_restart_past_max_restarts(tmp_path: Path) -> None:
    supervisor, marker, runs = flaky_server(tmp_path, 0, "Path(sys.argv[0]).with_name('up').touch()")
    try:
        answers = four_calls_to_a_dead_server(supervisor, marker)
    finally:
        supervisor.close()
    assert all(type(a) is BackendUnreachable for a in answers)
    assert not runs.exists() and supervisor.restarts == []


def test_run_ids_are_unique_for_runs_of_one_spec_in_one_second(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lmflow.engine.records import new_run_id

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: new_run_id("same"), range(40)))
    assert len(set(ids)) == 40
    assert all(i.startswith("same-") for i in ids)
