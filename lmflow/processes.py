"""Child processes that never outlive lmflow.

Three layers, because each alone has a gap:
1. `stop()` in a `finally` / context manager: normal exit, errors, Ctrl-C, SIGTERM
   (the CLI turns SIGTERM into SystemExit so `finally` blocks run).
2. Linux `PR_SET_PDEATHSIG`: the kernel sends SIGKILL to the child when the
   thread that started it dies, which covers `kill -9` of lmflow. SIGKILL, not
   SIGTERM: a llama-server caught mid-request was seen to hang in its graceful
   shutdown for good, an orphan after all. The *thread*, not the process: a
   child started from a step's worker thread would be killed when the pool
   retires that thread. So every child is started from one dedicated thread
   that lives as long as the process (`_Spawner`), whichever thread asks.
   The forked copy of lmflow runs no Python code before exec (unsafe once other
   threads hold locks): the child execs a small fresh interpreter that sets
   PDEATHSIG and then execs the program (`_DIE_WITH_PARENT`).
3. A PID file per child under lmflow's home: the next lmflow that starts
   reaps children whose owner is gone (covers platforms without PDEATHSIG).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil

from .home import home_path, subdir

#: what a child runs first: a fresh interpreter (started by exec, so the forked copy of lmflow
#: runs no Python code between fork and exec, which is unsafe in a multi-threaded process) asks
#: the kernel for SIGKILL when its parent thread dies, checks that the parent is still there, and
#: execs the real program in its place (same PID). Costs ~20 ms per child.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):
        os._exit(1)  # the parent died before prctl: the signal will never come
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"lmflow: cannot start {sys.argv[2]}: {exc}\\n")
    os._exit(127)
"""


def _die_with_parent(args: Sequence[str]) -> list[str]:
    """`args` run through `_DIE_WITH_PARENT` (`-I -S`: no site, no user paths, ~20 ms)."""
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]


class _Spawner:
    """One daemon thread, started on first use, that forks every child.

    PR_SET_PDEATHSIG watches the thread that forked, so that thread must live as long as
    the process; a daemon thread ends only when the process does (and does not hold up
    its exit). Requests are functions run on that thread, answered through futures.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, request: Callable[[], Any]) -> Any:
        """`request()` run on the spawner thread; its result, or its exception raised here."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="lmflow-spawner", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return request()  # a request that spawns: queueing it would wait for itself
        future: Future = Future()
        self._requests.put((request, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            request, future = self._requests.get()
            try:
                future.set_result(request())
            except BaseException as exc:  # noqa: BLE001 - the asking thread raises it
                future.set_exception(exc)


_spawner = _Spawner()


def _registry() -> Path:
    return subdir("pids")


def spawn(args: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
          label: str) -> subprocess.Popen:
    """Start a child in its own session (Ctrl-C goes to lmflow, which stops it in order).

    Safe from any thread: the fork itself happens on the spawner thread (see `_Spawner`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if not args:
        raise ValueError("spawn: no command to run")
    # the wrapper would only say so in the log: a missing program is an OSError here, as before
    if shutil.which(args[0], path=(env or os.environ).get("PATH")) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), args[0])
    command = _die_with_parent(args)

    def start() -> subprocess.Popen:
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        try:  # no preexec_fn: subprocess forks and execs in C (and may use vfork)
            return subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        finally:
            log.close()

    proc: subprocess.Popen = _spawner.run(start)
    record = {
        "pid": proc.pid, "label": label, "args": list(args),
        "create_time": psutil.Process(proc.pid).create_time(),
        "owner_pid": os.getpid(), "owner_create_time": psutil.Process().create_time(),
    }
    _write_record(proc.pid, record)
    return proc


def _write_record(pid: int, record: dict[str, Any]) -> None:
    # written aside and renamed: `reap_orphans` in another lmflow never reads half a file
    # (it would take it for garbage and delete it); one file per child, so threads never share one
    path = _registry() / f"{pid}.json"
    partial = path.with_name(f".{pid}.json.partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def stop(proc: subprocess.Popen, *, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; forget its PID file."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
    finally:  # (the registry's path, not made anew: a home deleted under us stays deleted)
        (home_path() / "pids" / f"{proc.pid}.json").unlink(missing_ok=True)


def _same_process(pid: int, create_time: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        return proc if abs(proc.create_time() - create_time) < 0.01 else None
    except psutil.Error:
        return None


def reap_orphans() -> list[int]:
    """Stop children of lmflow processes that died without stopping them."""
    reaped = []
    for path in _registry().glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if _same_process(record["owner_pid"], record["owner_create_time"]):
            continue  # its owner is alive and responsible for it
        child = _same_process(record["pid"], record["create_time"])
        if child is not None:
            child.terminate()
            try:
                child.wait(5)
            except psutil.TimeoutExpired:
                child.kill()
            reaped.append(record["pid"])
        path.unlink(missing_ok=True)
    return reaped
