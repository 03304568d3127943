"""One map across machines: a `distribute: true` map's chunks as Prefect background task runs,
taken by `lmflow worker --tasks` wherever one runs.

The path is Prefect's own: `remote_chunk.delay(...)` creates a Scheduled task run in the flow run
(the chunk `step[a:b]` in its graph) that the Prefect server queues and pushes to one task worker
subscribed to it (`prefect.task_worker`). Its parameters (the chunk's items: names, resolved
options, cache keys) are kept by Prefect in its result storage, which lmflow points at
`$LMFLOW_SHARED/results` on every machine (lmflow.prefect.server); the step cache lives there too,
so an item answered on any machine is reused by a re-run on any other. docs/distributed.md says
why task workers and not a deployment per chunk.

The flow's side (`RemoteChunks`, used by the flow's executor):
- before a chunk goes, at least one task worker must be connected (Prefect's `/task_workers`),
  else its items fail at once with the fix (a run with no worker never hangs);
- each worker writes the chunk's report, `$LMFLOW_SHARED/chunks/<run>/<chunk>.jsonl`: who took
  it, a line per item as it ends (its answer, or its failure as shaped there), a last line when
  the chunk ends; and it touches the file every `BEAT` seconds. The flow reads the new lines and
  reports each item once (its record, journal line, output and progress are the flow's, as
  for a local chunk);
- a chunk whose report stops changing for `LOST_AFTER` seconds (its worker killed, its machine
  gone) is lost: its task run is marked Crashed and its unreported items go out again as the
  chunk's next attempt (`step[a:b]#2`), which any worker takes. Items already reported are
  kept; an item in flight on the lost worker is asked again (once in the output, whatever
  happens: the flow reports a unit once).

The worker's side (`serve_chunks`): Prefect's TaskWorker serving `remote_chunk`. A chunk runs
with the spec from this machine's checkout of the repository (the same version as the run's:
its sha256 is checked), the spec's servers mapped to this machine's own (`--server NAME=URL`),
and each item through the same `Lifecycle.attempts` as a local chunk's (its retries, cache).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ..engine.records import RunRecorder
from ..engine.runtime import Runtime
from ..engine.unit import Chunk, Lifecycle, Ran, Unit
from ..errors import DistributedError, FailedElsewhere, LmflowError, StepFailure
from ..home import shared
from ..steps import StepResult

#: seconds between a worker's touches of its chunk's report (its heartbeat)
BEAT = 2.0
#: a chunk whose report has not changed for this long has lost its worker
LOST_AFTER = 15.0
#: how often the flow reads the reports of its chunks in flight
POLL = 0.2
#: a chunk goes out at most this many times (its first attempt and two after lost workers)
ATTEMPTS = 3
#: how often the flow asks whether a worker is still connected while chunks wait for one
WORKERS_EVERY = 5.0
#: chunks wait this long for a worker once the run has seen one (a worker restarting, another one
#: starting); a run that never saw one fails at once
NO_WORKER_GRACE = 60.0


def shared_folder() -> Path:
    """`$LMFLOW_SHARED`, or the error that says how to set it."""
    folder = shared()
    if folder is None:
        raise DistributedError(
            "a distributed map needs a folder every machine reaches: set LMFLOW_SHARED to it (each "
            "machine to its own mount of the same folder) here and for `lmflow worker --tasks`, or "
            "remove `distribute: true` to run the map in this process")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _file_name(name: str) -> str:
    """`triage[0:256]#2` -> `triage-0-256-2`: a chunk's name as a file name."""
    return "".join(c if c.isalnum() or c in "._" else "-" for c in name).strip("-")


@task(task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def remote_chunk(name: str, job: dict[str, Any]) -> dict[str, int]:
    """A distributed map's chunk, on a task worker (`lmflow worker --tasks`)."""
    if _WORKER is None:
        raise DistributedError("remote_chunk runs on `lmflow worker --tasks` only")
    return _WORKER.run(name, job)


# -- the flow's side -----------------------------------------------------------------------------

@dataclass(eq=False)
class _Sent:
    """One attempt of a chunk, out with Prefect."""

    chunk: Chunk
    attempt: int
    name: str
    report: Path
    task_run_id: Any
    #: its units not reported yet, by their index in the map
    units: dict[int, Unit]
    changed: float = field(default_factory=time.monotonic)
    seen: tuple[float, int] = (0.0, -1)  # the report's (mtime, size) when last read
    offset: int = 0
    worker: str | None = None


class RemoteChunks:
    """The chunks of distributed maps that a run has out with Prefect's task workers (see the
    module's docstring). `report(chunk, unit, ran)` is called once per unit; `over(chunk)` once a
    chunk has nothing left out."""

    def __init__(self, recorder: RunRecorder, report: Callable[[Chunk, Unit, Ran], None],
                 over: Callable[[Chunk], None]):
        self.recorder = recorder
        self._report = report
        self._over = over
        self._sent: list[_Sent] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self._stopped_maps: set[str] = set()
        self._workers_checked = 0.0
        self._workers_seen = False  # a worker was connected once in this run
        self._no_worker_since: float | None = None
        self._folder: Path | None = None
        self._job: dict[str, Any] | None = None
        self._read_out: list[Path] = []  # reports of chunks that ended

    def submit(self, chunk: Chunk) -> None:
        """Send the chunk out; with no shared folder or no worker, its items fail with the fix."""
        chunk.dispatched.set()  # (the next chunk of the map does not wait for this one's items)
        try:
            self._prepare()
            if not self._workers_seen:
                _require_workers()
                self._workers_seen = True
            self._send(chunk, list(chunk.units), 1)
        except LmflowError as exc:
            self._fail(chunk, list(chunk.units), exc)
        except Exception as exc:  # noqa: BLE001 - Prefect's API: the chunk's items fail, the run goes on
            self._fail(chunk, list(chunk.units), DistributedError(
                f"chunk {chunk.name} could not be handed to Prefect: {type(exc).__name__}: {exc}"))

    def close(self) -> None:
        """The run is over (or stopping): workers start no more of its items; stop reading. The
        reports read to their end are removed (what they held is in the run's journal)."""
        if self._folder is not None:
            with suppress(Exception):
                (self._folder / "stop").touch()
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        for report in self._read_out:
            with suppress(Exception):
                report.unlink(missing_ok=True)

    # -- sending ---------------------------------------------------------------

    def _prepare(self) -> None:
        if self._job is not None:
            return
        folder = shared_folder() / "chunks" / self.recorder.result.run_id
        folder.mkdir(parents=True, exist_ok=True)
        result, spec = self.recorder.result, self.recorder.spec
        version = result.spec_version or {}
        # workers find it in their checkout by its path in the repository (outside git: its name)
        self._job = {"run": result.run_id, "flow_run": result.flow_run_id,
                     "spec": version.get("repo_path") or spec.file.name,
                     "sha256": version.get("sha256"), "params": spec.params,
                     "folder": folder.relative_to(shared_folder()).as_posix()}
        self._folder = folder

    def _send(self, chunk: Chunk, units: list[Unit], attempt: int) -> None:
        assert self._job is not None and self._folder is not None
        name = chunk.name if attempt == 1 else f"{chunk.name}#{attempt}"
        report = f"{_file_name(name)}.jsonl"
        job = {**self._job, "step": chunk.step.id, "width": chunk.width, "report": report,
               "units": [{"name": u.name, "index": u.index, "options": u.options, "key": u.key,
                          "refresh": u.refresh} for u in units]}
        future = remote_chunk.delay(name, job)
        sent = _Sent(chunk, attempt, name, self._folder / report, future.task_run_id,
                     {u.index: u for u in units if u.index is not None})
        with self._lock:
            self._sent.append(sent)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="lmflow-remote-chunks",
                                                 daemon=True)
                self._watcher.start()

    # -- reading -----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(POLL):
            with self._lock:
                sent = list(self._sent)
            for one in sent:
                try:
                    self._read(one)
                except Exception as exc:  # noqa: BLE001 - a chunk that cannot be followed fails alone
                    self._end(one, DistributedError(f"chunk {one.name}: its report could not be read: "
                                                    f"{exc}"))
            waiting = [one for one in sent if one.worker is None and one in self._sent]
            if waiting and time.monotonic() - self._workers_checked > WORKERS_EVERY:
                self._check_workers(waiting)

    def _check_workers(self, waiting: list[_Sent]) -> None:
        """Chunks not taken yet: they fail once no worker has been connected for NO_WORKER_GRACE."""
        now = self._workers_checked = time.monotonic()
        try:
            _require_workers()
            self._no_worker_since = None
        except LmflowError as exc:
            self._no_worker_since = self._no_worker_since or now
            if now - self._no_worker_since >= NO_WORKER_GRACE:
                for one in waiting:
                    self._end(one, DistributedError(f"{exc} (none for {NO_WORKER_GRACE:g} s)"))

    def _read(self, one: _Sent) -> None:
        step = one.chunk.step.id
        if one.chunk.stop.is_set() and step not in self._stopped_maps and self._folder is not None:
            self._stopped_maps.add(step)  # its first failure with on_item_error: fail
            (self._folder / f"{_file_name(step)}.stop").touch()
        try:
            stat = one.report.stat()
        except FileNotFoundError:
            return  # not taken yet (`_watch` checks a worker is still there)
        if (stat.st_mtime, stat.st_size) != one.seen:
            one.seen, one.changed = (stat.st_mtime, stat.st_size), time.monotonic()
        if stat.st_size > one.offset:
            with open(one.report, "rb") as report:
                report.seek(one.offset)
                data = report.read(stat.st_size - one.offset)
            whole = data.rfind(b"\n") + 1  # a line still being written waits for the next read
            one.offset += whole
            for line in data[:whole].splitlines():
                if line.strip() and self._entry(one, json.loads(line)):
                    return
        if time.monotonic() - one.changed > LOST_AFTER:
            self._lost(one, f"its worker {one.worker or '(none yet)'} stopped answering "
                            f"(no sign of it for {LOST_AFTER:g} s)")

    def _entry(self, one: _Sent, entry: dict[str, Any]) -> bool:
        """One line of a report; True once the chunk is over."""
        if "worker" in entry:
            one.worker = entry["worker"]
            self.recorder.journal({"chunk": one.name, "step": one.chunk.step.id, "worker": one.worker,
                                   "items": len(one.units)})
        elif "i" in entry:
            unit = one.units.pop(entry["i"], None)
            if unit is not None:
                self._report(one.chunk, unit, _ran(entry))
        elif "end" in entry:
            if entry["end"] == "stopped" and one.units:  # its worker was stopped: others go on
                self._lost(one, f"its worker {one.worker} was stopped")
            else:
                error = entry.get("error")
                self._end(one, DistributedError(f"chunk {one.name} on {one.worker}: {error}")
                          if error else None)
            return True
        return False

    def _lost(self, one: _Sent, why: str) -> None:
        """Its worker is gone: the rest of the chunk goes out again, and so do the chunks no worker
        has started yet, since Prefect hands a worker its next chunk before it is free for it (a
        chunk that a dead worker held is never handed to another one)."""
        _set_state(one.task_run_id, "Crashed", f"lmflow: {why}")
        self._resend(one, why)
        with self._lock:
            held = [other for other in self._sent if other.worker is None]
        for other in held:
            with suppress(Exception):
                (other.report.parent / f"{other.report.name}.superseded").touch()  # its taker skips it
            _set_state(other.task_run_id, "Cancelled", "lmflow: sent again after a worker was lost")
            self._resend(other, f"a worker was lost while it waited (maybe held by {one.worker})")

    def _resend(self, one: _Sent, why: str) -> None:
        left = list(one.units.values())
        if not left or one.attempt >= ATTEMPTS or self._closed.is_set():
            self._end(one, DistributedError(f"chunk {one.name}: {why}, {one.attempt} times"))
            return
        if one.worker is not None:
            self.recorder.emit("warning", step=one.chunk.step.id, message=(
                f"chunk {one.name}: {why}; its {len(left)} unfinished items go to another worker"))
        with self._lock:
            if one not in self._sent:
                return
            self._sent.remove(one)
        one.units = {}
        try:
            self._send(one.chunk, left, one.attempt + 1)
        except Exception as exc:  # noqa: BLE001 - Prefect's API: what was left fails, never vanishes
            self._fail(one.chunk, left, DistributedError(
                f"chunk {one.name}: {why}, and it could not be sent again: {type(exc).__name__}: {exc}"))

    def _end(self, one: _Sent, error: BaseException | None) -> None:
        """The attempt is over: what it did not report fails with `error` (else never started)."""
        with self._lock:
            if one not in self._sent:
                return
            self._sent.remove(one)
        self._read_out.append(one.report)
        self._fail(one.chunk, list(one.units.values()), error)
        one.units = {}

    def _fail(self, chunk: Chunk, units: list[Unit], error: BaseException | None) -> None:
        for unit in units:
            self._report(chunk, unit, Ran(error=error) if error is not None else Ran(started=False))
        self._over(chunk)


def _ran(entry: dict[str, Any]) -> Ran:
    status = entry["s"]
    if status == "failed":
        return Ran(error=FailedElsewhere(StepFailure(**entry["f"])))
    if status == "not started":
        return Ran(started=False)
    return Ran(result=StepResult(**entry["r"]), cached=status == "cached")


def _require_workers() -> None:
    """At least one task worker is connected and takes lmflow's chunks, else the error with the fix."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        found = client._client.post("/task_workers/filter", json={
            "task_worker_filter": {"task_keys": [remote_chunk.task_key]}})
        found.raise_for_status()
    if not found.json():
        raise DistributedError(
            f"no lmflow task worker is connected to the Prefect server at {PREFECT_API_URL.value()}: start "
            "one with `lmflow worker --tasks` (with the same LMFLOW_SHARED and lmflow version) on a "
            "machine that has the spec's repository")


def _set_state(task_run_id: Any, state: str, message: str) -> None:
    """A lost chunk's task run Crashed, one sent again Cancelled: in Prefect's UI, not Running or
    Scheduled for good."""
    from prefect import states
    from prefect.client.orchestration import get_client

    with suppress(Exception), get_client(sync_client=True) as client:
        client.set_task_run_state(task_run_id, getattr(states, state)(message=message), force=True)


# -- the worker's side ---------------------------------------------------------------------------

@dataclass(eq=False)
class _Session:
    """What a worker keeps of one run while it takes the run's chunks: its spec, models, engines."""

    run: str
    runtime: Runtime
    lifecycle: Lifecycle
    chunks: int = 0  # running now


class _Worker:
    """This process as a task worker: chunks in, each item through the engine's lifecycle."""

    def __init__(self, repo: Path, servers: dict[str, str], say: Callable[[str], None]):
        self.repo = repo
        self.servers = servers
        self.say = say
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def run(self, name: str, job: dict[str, Any]) -> dict[str, int]:
        folder = shared_folder() / job["folder"]
        if (folder / f"{job['report']}.superseded").exists():
            self.say(f"skipped {name}: the run sent it again after a worker was lost")
            return {}
        started = time.perf_counter()
        self.say(f"took {name} of run {job['run']}: {len(job['units'])} items")
        with _Report(folder / job["report"], self.name,
                     [folder / "stop", folder / f"{_file_name(job['step'])}.stop"]) as report:
            try:
                session = self._session(job)
            except LmflowError as exc:
                report.write({"end": "failed", "error": str(exc)})
                self.say(f"refused {name}: {exc}")
                raise
            try:
                counts = self._items(session, job, report)
            finally:
                with self._lock:
                    session.chunks -= 1
            stopped = bool(counts.get("left"))
            report.write({"end": "stopped" if stopped else "completed", "counts": counts})
        done = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        seconds = time.perf_counter() - started
        self.say(f"{'stopped' if stopped else 'done'} {name}: {done} in {seconds:.1f} s")
        return counts

    def _items(self, session: _Session, job: dict[str, Any], report: _Report) -> dict[str, int]:
        from .flow import PrefectResults

        lifecycle = session.lifecycle
        step = session.runtime.spec.step(job["step"])
        cache = PrefectResults(session.runtime.recorder)
        counts = dict.fromkeys(("completed", "cached", "failed", "not started"), 0)
        width = max(1, int(job["width"]))
        slots = threading.BoundedSemaphore(width)
        counting = threading.Lock()

        def one(unit: Unit) -> None:
            try:
                ran = lifecycle.attempts(unit, cache)
            except BaseException as exc:  # noqa: BLE001 - the item's error, never lost
                ran = Ran(error=exc)
            finally:
                slots.release()
            if ran.error is not None:
                failure = lifecycle.failure(step, ran.error, unit.name)
                entry = {"i": unit.index, "s": "failed", "f": asdict(failure)}
            else:
                entry = {"i": unit.index, "s": "cached" if ran.cached else "completed",
                         "r": asdict(ran.result)}
            report.write(entry)
            with counting:
                counts["failed" if entry["s"] == "failed" else entry["s"]] += 1

        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="lmflow-item") as pool:
            for item in job["units"]:
                unit = Unit(step, item["name"], item["options"], item["index"], item["key"], item["refresh"])
                while not slots.acquire(timeout=0.2) and not report.stop.is_set() \
                        and not self.stopping.is_set():
                    pass
                if self.stopping.is_set():  # this worker stops: the flow sends the rest elsewhere
                    counts["left"] = len(job["units"]) - sum(counts.values())
                    break
                if report.stop.is_set():  # the run, or the map at its first failure, stops
                    report.write({"i": unit.index, "s": "not started"})
                    counts["not started"] += 1
                    continue
                pool.submit(contextvars.copy_context().run, one, unit)
        return counts

    def _session(self, job: dict[str, Any]) -> _Session:
        """The run's session on this worker (made by its first chunk here); the sessions of other
        runs with no chunk running are closed (their models unloaded, their engines stopped)."""
        with self._lock:
            session = self._sessions.get(job["run"])
            if session is None:
                for other in [s for s in self._sessions.values() if not s.chunks]:
                    del self._sessions[other.run]
                    _close(other)
                session = self._sessions[job["run"]] = self._open(job)
            session.chunks += 1
            return session

    def _open(self, job: dict[str, Any]) -> _Session:
        from ..provenance import spec_version
        from ..spec import load_spec
        from . import limits
        from .flow import PrefectExecutor

        path = self.repo / job["spec"]
        if not path.is_file():
            raise DistributedError(f"the run's spec {job['spec']} is not in this worker's checkout "
                                   f"{self.repo}: give `--repo` the checkout of the spec's repository")
        if job["sha256"] and spec_version(path)["sha256"] != job["sha256"]:
            raise DistributedError(f"{path} on this worker differs from the run's version of it: update "
                                   "this machine's checkout to the run's commit")
        spec = load_spec(path, job["params"])
        unknown = sorted(set(self.servers) - set(spec.servers))
        if unknown:
            self.say(f"warning: --server {', '.join(unknown)}: not a server of {job['spec']} "
                     f"(it has {', '.join(sorted(spec.servers))})")
        spec.servers = {name: replace(config, url=self.servers.get(name, config.url))
                        for name, config in spec.servers.items()}
        os.chdir(spec.dir)  # a python step's relative paths are relative to its spec, as in a run
        recorder = RunRecorder(spec)
        recorder.journal({"worker_for": job["run"], "flow_run": job["flow_run"]})
        runtime = Runtime(spec, recorder, limits.install(spec) if limits.shared_servers(spec) else None)
        return _Session(job["run"], runtime, Lifecycle(runtime, PrefectExecutor()))

    def close(self) -> None:
        self.stopping.set()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            _close(session)


def _close(session: _Session) -> None:
    """A run's session on this worker is over: its models unloaded, its engines stopped, its record
    written (a journal without one would look like a killed run's to the next run here)."""
    session.runtime.close()
    with suppress(Exception):
        session.runtime.recorder.save()


class _Report:
    """A chunk's report as its worker writes it: a line per item, touched every `BEAT` seconds (the
    flow's sign of life), and `stop` set once the run, or the map at its first failure, asks for no
    more items (seen within `BEAT` seconds)."""

    def __init__(self, path: Path, worker: str, stops: list[Path]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.stops = stops
        self.stop = threading.Event()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self._lock = threading.Lock()
        self._over = threading.Event()
        self.write({"worker": worker, "pid": os.getpid()})
        self._beat = threading.Thread(target=self._beating, name="lmflow-chunk-beat", daemon=True)
        self._beat.start()

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def _beating(self) -> None:
        while not self._over.wait(BEAT):
            with suppress(Exception):
                os.utime(self.path)
            if any(p.exists() for p in self.stops):
                self.stop.set()

    def __enter__(self) -> _Report:
        return self

    def __exit__(self, *exc: object) -> None:
        self._over.set()
        self._beat.join()
        self._file.close()


_WORKER: _Worker | None = None


def serve_chunks(repo: Path, servers: dict[str, str], limit: int, say: Callable[[str], None]) -> None:
    """Take distributed maps' chunks until SIGTERM or SIGINT; then the chunks in progress stop
    starting items (the flow sends what they did not finish to another worker)."""
    global _WORKER
    from .serving import _stop_on_signals

    shared_folder()  # (refused before connecting: a worker without the shared folder writes nothing)
    _WORKER = _Worker(repo, servers, say)
    try:
        with _stop_on_signals() as stop:
            asyncio.run(_serve(limit, stop))
    finally:
        _WORKER.close()
        _WORKER = None


async def _serve(limit: int, stop: Any) -> None:
    from prefect.task_worker import TaskWorker

    worker = TaskWorker(remote_chunk, limit=limit)
    running = asyncio.create_task(worker.astart())
    await asyncio.sleep(0.5)  # (its start sets a SIGTERM handler of its own: ours is set after it)
    stopped = stop.attach()
    waiting = asyncio.create_task(stopped.wait())
    await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if _WORKER is not None:
        _WORKER.stopping.set()
    waiting.cancel()
    if not running.done():
        running.cancel()
        with suppress(Exception):
            await running


def parse_servers(values: Iterator[str] | tuple[str, ...]) -> dict[str, str]:
    """`--server NAME=URL` values -> {name: url}; a value without `=` is a usage error."""
    servers: dict[str, str] = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise DistributedError(f"--server {value}: expected NAME=URL, e.g. "
                                   "--server gpu=http://127.0.0.1:1234")
        servers[name] = url
    return servers
