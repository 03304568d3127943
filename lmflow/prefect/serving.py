"""`lmflow serve` and `lmflow worker`: Prefect's Runner (specs served from this machine) or its
ProcessWorker (the runs of a work pool) driven in this process, a report of each run they take,
and a stop that leaves nothing behind.

Both start each flow run as a child process. They are driven here, not by `prefect.serve()` or
an exec of `prefect worker start`, for the sake of the stop. Prefect's own handlers called the
runner's async stop without awaiting it (a RuntimeWarning, runs left Submitting or Running) and
made the worker wait for its runs to finish. Here one SIGTERM or one SIGINT (Ctrl-C) stops the
process within seconds:

1. no new run is taken;
2. each run in progress is cancelled as the UI's Cancel does, set Cancelling through the API:
   Prefect's own observer in the runner or worker tells the run's process that it is cancelled,
   then SIGTERMs it, and the run ends Cancelled, all runs at once (the runner's `astop` cancels
   one after the other, 3 s each at least, and misses the runs it is still submitting). Runs
   are cancelled, not waited for: a run of model calls can take hours while a stop must take
   seconds (service managers kill after 10-90 s), and nothing finished is lost (a re-run
   reuses the cached steps);
3. once the runner or worker has exited (a served spec's schedule paused and its future runs
   deleted, as Prefect does), a run of this process still not in a final state (one picked up
   in the instant of the stop) is marked Cancelled;
4. then `serve`/`work` return, and the command exits 0: the stop asked for was done.

Ctrl-C in a terminal signals the whole process group, runs' processes included: they would end
Crashed, each printing a KeyboardInterrupt, and race the cancellation. So SIGINT is blocked in
this process and taken by one thread with `sigwait`; the runs' processes inherit the blocked
signal, and only their supervisor decides their fate. SIGTERM is not blocked: Prefect's
cancellation needs it in the runs' processes. (Under systemd, `KillMode=mixed` sends the stop's
SIGTERM to this process alone.)

The report: the state changes Prefect's server publishes as events (`prefect.flow-run.<State>`,
the stream Prefect's own workers watch for cancellations), of this process's deployments (a
spec is served by one process at a time: a second `lmflow serve` of it takes the deployment
over) or of the runs this worker took (a pool may have many workers; each labels the runs it
takes with its name). A `RunReport` when a run starts running and one when it ends, as Prefect
recorded them, with nothing hooked inside Prefect's runner or worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psutil
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.events.schemas.events import ReceivedEvent
from prefect.exceptions import ObjectNotFound
from prefect.runner import Runner
from prefect.settings import PREFECT_RUNNER_POLL_FREQUENCY, PREFECT_WORKER_QUERY_SECONDS, temporary_settings
from prefect.states import Cancelled, Cancelling
from prefect.utilities.services import critical_service_loop
from prefect.workers.process import ProcessWorker

from .deploy import Target, ensure_pool, require_server, runner_deployment

#: how often a served spec or a worker asks for runs to start (Prefect's default is 10 s): a run
#: started from the UI waits for the next poll
POLL_SECONDS = 2
FINAL = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})  # (StateType values)
#: a run taken but not over (Submitting is a Pending)
TAKEN = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
#: how long the runs in progress get to end after their cancellation (Prefect kills a run's
#: process 30 s after its SIGTERM) before the runner or worker stops regardless
CANCEL_GRACE = 60.0
#: at the stop, how long a run's end may lag behind its process's (Prefect records it, the event
#: stream brings it) before lmflow reads or marks it itself
SETTLE_SECONDS = 2.0

#: (event, fields): ("run", {"report": RunReport}), ("stopping", {"signal": "SIGTERM", "runs": 1}),
#: ("stopped", {}), ("warning", {"message": ...})
Listener = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class RunReport:
    """A run of this process started running, or ended."""

    state: str  # Prefect's state name: Running, Completed, Failed, Crashed, Cancelled
    ended: bool
    flow_run_id: str
    name: str  # the flow run's name: the run's id once the run has begun (lmflow.prefect.flow)
    spec: str
    url: str  # the flow run's page in Prefect's UI
    message: str = ""  # why it ended, when it did not complete
    scheduled: datetime | None = None  # the time a schedule gave it
    seconds: float | None = None  # how long it ran, once ended


def serve(chosen: list[Target], *, limit: int | None, listener: Listener) -> None:
    """Serve the specs from this process until SIGTERM or SIGINT (see the module's docstring)."""
    require_server()
    with _stop_on_signals() as stop, _polling():
        asyncio.run(_serve(chosen, limit, listener, stop))


def work(pool: str, *, repo: Path, limit: int | None, listener: Listener) -> None:
    """Run the process work pool's runs on this machine, its specs from the checkout `repo`, until
    SIGTERM or SIGINT (see the module's docstring)."""
    require_server()
    ensure_pool(pool)
    os.environ["LMFLOW_REPO"] = str(repo)  # the runs' processes find specs there (lmflow.prefect.flow)
    with _stop_on_signals() as stop, _polling():
        asyncio.run(_work(pool, limit, listener, stop))


# -- serve ---------------------------------------------------------------------------------------

class _Runner(Runner):
    """Prefect's runner, whose SIGTERM asks for the stop instead of calling its async stop from a
    signal handler without awaiting it (`Runner.start` installs the handler)."""

    def __init__(self, stop: _Stop, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stop = stop

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        self._stop.request(signal.SIGTERM)


async def _serve(chosen: list[Target], limit: int | None, listener: Listener, stop: _Stop) -> None:
    stopped = stop.attach()
    older = {child.pid for child in _children()}
    runner = _Runner(stop, name=f"lmflow-serve-{socket.gethostname()}-{os.getpid()}", limit=limit)
    ids = [await runner.aadd_deployment(runner_deployment(target)) for target in chosen]
    async with get_client() as client:
        scope = EventRelatedFilter(id=[f"prefect.deployment.{i}" for i in ids])
        async with _Watch(client, scope, listener) as watch:
            serving = asyncio.create_task(runner.start())
            if not await _until_stopped(stopped, serving):
                return
            listener("stopping", {"signal": stop.signal, "runs": watch.running()})
            reason = f"lmflow serve stopped ({stop.signal})"
            for deployment_id in ids:  # no run comes due any more, future ones are deleted (as
                await client.pause_deployment(deployment_id)  # the runner does at its exit)
            ours = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=ids), state=_taken())
            await _cancel(client, ours, reason, older)
            while not runner.started and not serving.done():  # the stop came while it started
                await asyncio.sleep(0.05)
            if runner.started:
                await runner.astop()  # stops polling (and cancels a run whose process it still has)
            while not serving.done():  # its exit waits for the runs it is still submitting:
                if not (await asyncio.wait({serving}, timeout=1.0))[0]:
                    await runner.cancel_all()  # their processes started after the cancellation
            serving.result()
            await _cancel_leftovers(client, ours, reason)
            await watch.settle()
    listener("stopped", {})


# -- worker --------------------------------------------------------------------------------------

async def _work(pool: str, limit: int | None, listener: Listener, stop: _Stop) -> None:
    stopped = stop.attach()
    older = {child.pid for child in _children()}
    worker = ProcessWorker(work_pool_name=pool, name=f"lmflow-{socket.gethostname()}-{os.getpid()}",
                           limit=limit)
    taken: set[UUID] = set()
    async with get_client() as client:
        scope = EventRelatedFilter(id=[f"prefect.work-pool.{(await client.read_work_pool(pool)).id}"])
        async with _Watch(client, scope, listener, worker=worker.name) as watch:
            quiet = asyncio.Event()
            working = asyncio.create_task(_take_runs(worker, taken, stopped, quiet))
            if not await _until_stopped(stopped, working):
                return
            listener("stopping", {"signal": stop.signal, "runs": watch.running()})
            reason = f"lmflow worker stopped ({stop.signal})"
            await quiet.wait()  # it takes no more runs: `taken` is complete
            ours = FlowRunFilter(id=FlowRunFilterId(any_=sorted(taken)), state=_taken())
            await _cancel(client, ours, reason, older)
            working.cancel()  # the worker exits (a run it was still submitting is cancelled with it)
            with suppress(asyncio.CancelledError):
                await working
            await _cancel_leftovers(client, ours, reason)
            await watch.settle()
    listener("stopped", {})


async def _take_runs(worker: ProcessWorker, taken: set[UUID], stopped: asyncio.Event,
                     quiet: asyncio.Event) -> None:
    """Prefect's worker loops (`BaseWorker.start`: poll for runs to start, heartbeat), driven here
    so that they end at the stop (then `quiet` is set) while the worker keeps the runs it holds;
    the runs it takes go into `taken`."""

    async def poll() -> None:
        # (a cancellation lands while it asks for runs, before it has started any: none is lost)
        taken.update(run.id for run in await worker.get_and_submit_flow_runs())

    async with worker:
        every = PREFECT_WORKER_QUERY_SECONDS.value()  # (POLL_SECONDS unless set: `_polling`)
        loops = {asyncio.create_task(critical_service_loop(workload=poll, interval=every,
                                                           jitter_range=0.3, backoff=4)),
                 asyncio.create_task(critical_service_loop(
                     workload=worker.sync_with_backend, interval=worker.heartbeat_interval_seconds,
                     jitter_range=0.3, backoff=4))}
        waiting = asyncio.create_task(stopped.wait())
        try:
            done, _ = await asyncio.wait({waiting, *loops}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, *loops):
                task.cancel()
            await asyncio.wait(loops)
            quiet.set()
        for task in done - {waiting}:
            task.result()  # a loop that failed for good (not an HTTP error) ends the worker
        await asyncio.Event().wait()  # holds the worker (its runs) until this task is cancelled


# -- both ----------------------------------------------------------------------------------------

async def _until_stopped(stopped: asyncio.Event, running: asyncio.Task) -> bool:
    """Wait for the stop (True) or for the runner or worker to end on its own (False: its error is
    raised)."""
    waiting = asyncio.create_task(stopped.wait())
    await asyncio.wait({waiting, running}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if running.done() and not stopped.is_set():
        running.result()
        return False
    return True


def _taken() -> FlowRunFilterState:
    return FlowRunFilterState(type=FlowRunFilterStateType(any_=TAKEN))


async def _cancel(client: PrefectClient, runs: FlowRunFilter, reason: str, older: Collection[int]) -> None:
    """Cancel the runs of this process that are not over, as the UI's Cancel does: Prefect's
    observer in the runner or worker tells the run's process, then SIGTERMs it, and the run ends
    Cancelled, all runs at once. Returns once every run is over, or else once none is Pending or
    Running and the runs' processes (this process's children) have been gone SETTLE_SECONDS (a
    run left Cancelling has no process: `_cancel_leftovers`), or after CANCEL_GRACE. `older`: the
    children this process had before it served, not runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_GRACE
    asked: set[UUID] = set()
    settled: float | None = None  # since when nothing runs any more
    while loop.time() < deadline:
        left = await client.read_flow_runs(flow_run_filter=runs)
        if not left:
            return
        running = [r for r in left if r.state_type in (StateType.PENDING, StateType.RUNNING)]
        for flow_run in running:
            if flow_run.id not in asked:
                asked.add(flow_run.id)
                await client.set_flow_run_state(flow_run.id, Cancelling(message=reason))
        if running or _children(older):
            settled = None
        elif settled is None:
            settled = loop.time()
        elif loop.time() - settled > SETTLE_SECONDS:
            return
        await asyncio.sleep(0.25)


def _children(older: Collection[int] = ()) -> list[psutil.Process]:
    """This process's children alive, but those in `older` (PIDs): the runs' processes, when
    `older` holds the children it had before it served (the runner and the worker start nothing
    else)."""
    alive = []
    for child in psutil.Process().children():
        with suppress(psutil.Error):
            if child.pid not in older and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
    return alive


async def _cancel_leftovers(client: PrefectClient, runs: FlowRunFilter, reason: str) -> None:
    """Mark Cancelled the runs of this process that the stop left not over (one whose process was
    told to cancel before it began, Cancelling for good; one picked up in the instant of the stop):
    their processes are gone with the runner or worker, so nothing else will."""
    for flow_run in await client.read_flow_runs(flow_run_filter=runs):
        await client.set_flow_run_state(flow_run.id, Cancelled(message=f"{reason} before the run ended"),
                                        force=True)


def _polling() -> AbstractContextManager[Any]:
    """Served specs and workers ask for runs every POLL_SECONDS, unless Prefect's own settings say."""
    return temporary_settings(updates={setting: POLL_SECONDS for setting in (
        PREFECT_RUNNER_POLL_FREQUENCY, PREFECT_WORKER_QUERY_SECONDS) if setting.name not in os.environ})


class _Watch:
    """Reports the runs of this process from the state changes Prefect's server publishes: a run of
    the deployments or the work pool in `scope` and, for a worker, labelled with its name."""

    def __init__(self, client: PrefectClient, scope: EventRelatedFilter, listener: Listener,
                 worker: str | None = None):
        self._client = client
        self._filter = EventFilter(event=EventNameFilter(prefix=["prefect.flow-run."]), related=scope)
        self._listener = listener
        self._worker = worker
        self._ui = str(client.api_url).rstrip("/").removesuffix("/api")
        self._since = datetime.now(timezone.utc)  # the stream starts with a minute of past events
        #: a run's id -> "started" | "ended" | "" (another worker's)
        self._reported: dict[UUID, str] = {}
        self._following: asyncio.Task | None = None

    async def __aenter__(self) -> _Watch:
        self._following = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._following is not None:
            self._following.cancel()
            with suppress(asyncio.CancelledError):
                await self._following

    def running(self) -> int:
        return sum(1 for what in self._reported.values() if what == "started")

    async def _follow(self) -> None:
        """(The stream starts with the last minute's events: what came while it connected too.)"""
        try:
            async with get_events_subscriber(filter=self._filter) as events:
                async for event in events:
                    try:
                        await self._seen(event)
                    except (httpx.HTTPError, ObjectNotFound):  # an API blip, a run deleted since:
                        continue  # that event goes unreported, the next ones not
        except Exception as exc:  # noqa: BLE001 - the top of this task: serving goes on without lines
            self._listener("warning", {"message": f"Prefect's event stream was lost ({exc}): runs are "
                                                  "no longer reported here (the UI shows them)"})

    async def _seen(self, event: ReceivedEvent) -> None:
        state = event.resource.get("prefect.state-type")
        if event.occurred < self._since or state not in ("RUNNING", *FINAL):
            return
        run_id = UUID(event.resource.id.removeprefix("prefect.flow-run."))
        before = self._reported.get(run_id)
        if before in ("ended", "") or (state == "RUNNING" and before == "started"):
            return
        flow_run = await self._client.read_flow_run(run_id)
        if self._worker is not None and flow_run.labels.get("prefect.worker.name") != self._worker:
            self._reported[run_id] = ""
            return
        self._report(flow_run, event.resource.get("prefect.state-name") or flow_run.state_name or "?",
                     ended=state != "RUNNING", message=event.resource.get("prefect.state-message"))

    def _report(self, flow_run: FlowRun, state: str, *, ended: bool, message: str | None) -> None:
        if self._reported.get(flow_run.id) == "ended":  # (by `settle` and by the stream at once)
            return
        self._reported[flow_run.id] = "ended" if ended else "started"
        tags = flow_run.tags or []
        spec = next((t.removeprefix("spec:") for t in tags if t.startswith("spec:")), "?")
        seconds = None
        if ended and flow_run.start_time and flow_run.end_time:
            seconds = (flow_run.end_time - flow_run.start_time).total_seconds()
        self._listener("run", {"report": RunReport(
            state=state, ended=ended, flow_run_id=str(flow_run.id), name=flow_run.name, spec=spec,
            url=f"{self._ui}/runs/flow-run/{flow_run.id}",
            message=(message or "") if ended and state != "Completed" else "",
            scheduled=flow_run.expected_start_time if flow_run.auto_scheduled and not ended else None,
            seconds=seconds)})

    async def settle(self) -> None:
        """At the stop: the end of each run reported as started, read from Prefect when the stream
        has not brought it within SETTLE_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_SECONDS
        while self.running() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for run_id in [r for r, what in self._reported.items() if what == "started"]:
            flow_run = await self._client.read_flow_run(run_id)
            if flow_run.state is not None and flow_run.state.type.value in FINAL:
                self._report(flow_run, flow_run.state.name, ended=True, message=flow_run.state.message)


class _Stop:
    """The stop the first SIGTERM or SIGINT asks for, from whichever thread takes the signal."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def attach(self) -> asyncio.Event:
        """The event set by the stop, in the running loop (also when the signal came before it)."""
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):  # (SIGINT: in case a thread that predates
            self._loop.add_signal_handler(signum, self.request, signum)  # the mask takes it)
        if self.signal is not None:
            self._event.set()
        return self._event

    def request(self, signum: int) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)


@contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    """SIGTERM and SIGINT ask for the stop while the block runs; SIGINT blocked, taken by a thread
    of its own (see the module's docstring). Blocked before Prefect starts its threads and the
    runs' processes, so that all of them inherit the mask."""
    stop = _Stop()
    closing = threading.Event()

    def take_sigint() -> None:
        while True:
            signal.sigwait({signal.SIGINT})
            if closing.is_set():
                return
            stop.request(signal.SIGINT)

    term, intr = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    taker = threading.Thread(target=take_sigint, name="lmflow-sigint", daemon=True)
    taker.start()
    try:
        yield stop
    finally:
        closing.set()
        signal.pthread_kill(taker.ident, signal.SIGINT)  # type: ignore[arg-type]  # ends its sigwait
        taker.join()
        signal.signal(signal.SIGTERM, term)  # (the loop's end left both at their defaults)
        signal.signal(signal.SIGINT, intr)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
