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
3. A PID file per child under lmflow's home: the next lmflow that starts
   reaps children whose owner is gone (covers platforms without PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil

from .home import subdir

_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent: the child runs no dynamic loading between fork
    and exec (another thread may have held the loader's lock at fork time)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl: Callable[..., int], parent: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: the signal will never come
            os._exit(1)

    return preexec


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
    prctl = _prctl()
    preexec = _die_with_parent(prctl, os.getpid()) if prctl is not None else None

    def start() -> subprocess.Popen:
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(
                list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=preexec,
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
    finally:
        (_registry() / f"{proc.pid}.json").unlink(missing_ok=True)


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
