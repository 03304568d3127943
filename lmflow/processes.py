"""Child processes that never outlive lmflow.

Three layers, because each alone has a gap:
1. `stop()` in a `finally` / context manager: normal exit, errors, Ctrl-C, SIGTERM
   (the CLI turns SIGTERM into SystemExit so `finally` blocks run).
2. Linux `PR_SET_PDEATHSIG`: the kernel sends SIGKILL to the child when the
   thread that started it dies, which covers `kill -9` of lmflow. SIGKILL, not
   SIGTERM: a llama-server caught mid-request was seen to hang in its graceful
   shutdown for good, an orphan after all.
3. A PID file per child under lmflow's home: the next lmflow that starts
   reaps children whose owner is gone (covers platforms without PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil

from .home import subdir

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _registry() -> Path:
    return subdir("pids")


def spawn(args: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
          label: str) -> subprocess.Popen:
    """Start a child in its own session (Ctrl-C goes to lmflow, which stops it in order)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        proc = subprocess.Popen(
            list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    finally:
        log.close()
    record = {
        "pid": proc.pid, "label": label, "args": list(args),
        "create_time": psutil.Process(proc.pid).create_time(),
        "owner_pid": os.getpid(), "owner_create_time": psutil.Process().create_time(),
    }
    (_registry() / f"{proc.pid}.json").write_text(json.dumps(record))
    return proc


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
