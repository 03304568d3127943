"""Keep a model server up: start it when it is down, restart it when it dies mid-run.

A server lmflow starts (with `server.start`) is lmflow's child: it is stopped
by PID when the run ends, like the managed engine. A start command that
daemonises (`lms server start` exits once the server runs) leaves no child to
stop: `server.stop` (by default `lms server stop` after `lms server start`) is
run instead, and without one the run says the server is left running.

Steps call it from several worker threads. When the server dies, every call in
flight fails at about the same time; one of them restarts it (the others wait
on the lock for that restart, then retry on the new server), so one crash costs
one restart. A count of starts, read before each call, tells a failed call
whether the server was (re)started since it began.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .. import processes
from ..errors import (
    BackendUnreachable,
    ServerDown,  # noqa: F401 - raised here, defined with the tree
)
from ..home import subdir
from ..spec.model import ServerConfig

T = TypeVar("T")
Listener = Callable[[str, dict[str, Any]], None]


class Supervisor:
    """Health checks, the start command, and a bounded number of restarts (each recorded)."""

    def __init__(self, config: ServerConfig, health: Callable[[], bool],
                 after_restart: Callable[[], None] = lambda: None):
        self.config = config
        self.health = health
        self.after_restart = after_restart
        self.proc: subprocess.Popen | None = None
        self.restarts: list[dict[str, Any]] = []
        self.listener: Listener = lambda event, data: None
        # held for a whole start or restart (seconds): callers that need one wait for it here.
        # `after_restart` runs under it, so it must not call back into the supervisor, nor wait
        # for a lock that a thread holds while it calls `call` (a model lock around a load).
        self._lock = threading.Lock()
        self._starts = 0  # starts and restarts so far, failed ones too
        self._failure: str | None = None  # why the last one failed (None: it worked)

    def ensure(self) -> dict[str, Any]:
        """Make sure the server answers; start it when it does not and a start command is set."""
        if self.health():
            return {"url": self.config.url, "was_running": True, "started": False, "seconds": 0.0}
        with self._lock:
            if self.health():  # another thread started it while this one waited
                return {"url": self.config.url, "was_running": True, "started": False, "seconds": 0.0}
            if not self.config.start:
                raise ServerDown(f"no server answers at {self.config.url}: start it, or set server.start "
                                 "(e.g. `lms server start`) so lmflow can")
            seconds = self._attempt(restart=False)
        return {"url": self.config.url, "was_running": False, "started": True, "seconds": seconds}

    def _attempt(self, *, restart: bool) -> float:
        """Start the server (lock held), counted and its failure remembered, for `_recover`."""
        try:
            seconds = self._start()
            if restart:
                self.after_restart()  # under the lock too: the others retry once models are back
        except ServerDown as down:
            self._failure = str(down)
            raise
        except BaseException as error:
            self._failure = f"{type(error).__name__}: {error}"
            raise
        finally:
            # counted once the start is over: a call that began during it (and failed, the
            # server being still down) must not start it again
            self._starts += 1
        self._failure = None
        return seconds

    def _start(self) -> float:
        started = time.monotonic()
        if self.proc is not None:
            processes.stop(self.proc)
        log = subdir("logs") / f"server-{self.config.name}.log"
        try:
            self.proc = processes.spawn(shlex.split(self.config.start or ""), log_path=log,
                                        label=f"server {self.config.name}")
        except OSError as exc:
            raise ServerDown(f"cannot run `{self.config.start}` (server.start): {exc}") from None
        deadline = started + self.config.startup_timeout
        while time.monotonic() < deadline:
            if self.health():
                return round(time.monotonic() - started, 3)
            if self.proc.poll() not in (None, 0):
                raise ServerDown(f"`{self.config.start}` exited with code {self.proc.returncode}; "
                                 f"see {log}")
            # a command such as `lms server start` exits once the daemon runs: that is fine;
            # a foreground server that exited has failed
            time.sleep(0.1)
        raise ServerDown(f"`{self.config.start}` did not bring up {self.config.url} within "
                         f"{self.config.startup_timeout:g}s; see {log}")

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn`; if the server is unreachable and can be restarted, restart it and retry once."""
        from .base import checked

        seen = self._starts
        try:
            return checked(self.config.url, fn)
        except BackendUnreachable as exc:
            self._recover(seen, exc)
        return checked(self.config.url, fn)

    def _recover(self, seen: int, exc: BackendUnreachable) -> None:
        """Restart the server for a call that began after start number `seen` and found it down;
        if another thread (re)started it since, use that start instead (or fail as it did)."""
        with self._lock:
            if self._starts != seen:
                if self._failure is not None:
                    raise ServerDown(f"{exc}; restarting it failed: {self._failure}") from None
                return
            if not self.config.start or len(self.restarts) >= self.config.max_restarts:
                raise exc
            noticed = time.monotonic()
            try:
                seconds = self._attempt(restart=True)
            except ServerDown as down:
                raise ServerDown(f"{exc}; restarting it failed: {down}") from None
            record = {"url": self.config.url, "restart": len(self.restarts) + 1,
                      "of": self.config.max_restarts, "seconds": seconds,
                      "recovered_in": round(time.monotonic() - noticed, 3), "error": str(exc)}
            self.restarts.append(record)
        self.listener("server_restarted", record)
        self.listener("warning", {"message": (
            f"{self.config.url} was down; restarted it with `{self.config.start}` "
            f"(restart {record['restart']} of {record['of']}) and continued after "
            f"{record['recovered_in']:.1f}s")})

    def close(self) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        daemon = proc.poll() == 0  # the start command exited once the server ran
        processes.stop(proc)
        if daemon:
            self._stop_daemon()

    def _stop_daemon(self) -> None:
        """Stop a server the start command left running as a daemon, with `server.stop`."""
        command = self.config.stop or default_stop(self.config.start or "")
        if command is None:
            self.listener("warning", {"message": (
                f"`{self.config.start}` left the server at {self.config.url} running as a daemon, "
                "and it is still running: set server.stop to a command that stops it")})
            return
        log = subdir("logs") / f"server-{self.config.name}.log"
        try:
            stopper = processes.spawn(shlex.split(command), log_path=log, label=f"stop {self.config.name}")
        except OSError as exc:
            return self._stop_failed(command, str(exc))
        try:
            code = stopper.wait(self.config.startup_timeout)
        except subprocess.TimeoutExpired:
            processes.stop(stopper)
            return self._stop_failed(command, f"no end within {self.config.startup_timeout:g}s")
        if code != 0:
            self._stop_failed(command, f"exit code {code}; see {log}")
        return None

    def _stop_failed(self, command: str, detail: str) -> None:
        self.listener("warning", {"message": (
            f"`{command}` (server.stop) failed ({detail}): the server at {self.config.url} may "
            "still be running")})


def default_stop(start: str) -> str | None:
    """The stop command that goes with a daemonising start command lmflow knows."""
    words = shlex.split(start)
    if len(words) >= 3 and words[0].rsplit("/", 1)[-1] == "lms" and words[1:3] == ["server", "start"]:
        return shlex.join([words[0], "server", "stop"])
    return None
