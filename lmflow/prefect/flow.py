"""Spec -> Prefect flow: the flow, and the executor that makes units Prefect task runs.

`lmflow_flow` is one top-level, importable flow that takes the spec's path, so
a deployment can re-import it by name; `run()` gives it the spec's name for
the UI. In the flow's thread, lmflow.engine's scheduler starts every step whose
dependencies have finished and hands their units (steps, map items `step[i]`,
checkpoint steps `loop@5.step`) to `PrefectExecutor`: each a task run of Prefect's
ThreadPoolTaskRunner with its step's retries and cache, waiting for (`wait_for`) the
task runs of the steps it depends on, so Prefect's graph is the spec's graph. See
docs/architecture.md and docs/dataflow.md.
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from ..engine.records import Listener, RunRecorder, RunResult
from ..engine.recovery import release_leftovers
from ..engine.runtime import Runtime
from ..engine.scheduler import Scheduler
from ..engine.unit import Chunk, Lifecycle, Ran, Unit
from ..engine.working_directory import working_directory
from ..errors import LmflowError, StepFailed
from ..spec import load_spec
from ..spec.model import Spec, StepSpec
from ..steps import StepResult, get_kind
from . import limits
from .server import configure_environment

if TYPE_CHECKING:
    from .distributed import RemoteChunks

_LIFECYCLE: contextvars.ContextVar[Lifecycle] = contextvars.ContextVar("lmflow_lifecycle")
_RECORDER: contextvars.ContextVar[RunRecorder] = contextvars.ContextVar("lmflow_recorder")
#: the pool's ceiling; the scheduler keeps at most the spec's max_parallel task runs in flight,
#: so only that many threads are ever created
POOL_SIZE = 256


@task(persist_result=True)
def run_step(name: str, step_id: str, options: dict[str, Any], index: int | None = None,
             cache_key: str | None = None) -> StepResult:
    """One unit of a run: a step, a map item or a checkpoint's step (task runs `step`, `step[i]`,
    `loop@5.step`): one attempt, through the unit's lifecycle."""
    lifecycle = _LIFECYCLE.get()
    found = lifecycle.reused(cache_key)  # (Prefect's cache did not answer: it lost the answer?)
    if found is not None:
        return PrefectResults.cached(cache_key, *found)  # type: ignore[arg-type]
    result = lifecycle.attempt(lifecycle.runtime.spec.step(step_id), options, name, index)
    _log_errors(result)
    return result


def _log_errors(result: StepResult, name: str | None = None) -> None:
    """What failed before an answer came, in Prefect's history too (`name`: the item in a chunk)."""
    if not result.errors:
        return
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    where = f"{name}: " if name else ""
    for error in result.errors:
        attempt = f" (attempt {error['attempt']})" if error.get("attempt") else ""
        logger.warning(f"{where}{error['target']}{attempt}: {error['error_type']}: {error['message']}")
    if result.answered_by:
        logger.warning(f"{where}answered by {result.answered_by['target']}")


@task(task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def run_chunk(name: str, step_id: str) -> dict[str, int]:
    """Many items of a map as one task run (`step[a:b]`): each item with its own tries, cache and
    outcome (`Lifecycle.attempts`), at most the map's window in flight across its chunks."""
    lifecycle = _LIFECYCLE.get()
    executor = lifecycle.executor
    assert isinstance(executor, PrefectExecutor)
    chunk = executor.chunks.pop(name)
    cache = PrefectResults(lifecycle.runtime.recorder)
    stopping = lifecycle.runtime.stopping
    counts = {"completed": 0, "cached": 0, "failed": 0, "not started": 0}
    counting = threading.Lock()  # (the items' threads count at once)

    def count(what: str) -> None:
        with counting:
            counts[what] += 1

    def one(unit: Unit) -> None:
        try:
            ran = lifecycle.attempts(unit, cache)
            if ran.result is not None and not ran.cached:
                _log_errors(ran.result, unit.name)
        except BaseException as exc:  # noqa: BLE001 - reported as the item's error, never lost
            ran = Ran(error=exc)
        if ran.error is not None and chunk.step.on_item_error == "fail":
            chunk.stop.set()  # before its slot is free: no later item starts (as with grain: item)
        chunk.slots.release()
        count("failed" if ran.error is not None else "cached" if ran.cached else "completed")
        executor.report(chunk, unit, ran)

    def stopped() -> bool:
        return chunk.stop.is_set() or stopping.is_set()

    try:
        # the items of the chunk before start first: a map's items start in their order
        while chunk.previous is not None and not chunk.previous.dispatched.wait(0.2) and not stopped():
            pass
        chunk.previous = None  # else every chunk of the map would stay alive through the next one
        with ThreadPoolExecutor(max_workers=chunk.width, thread_name_prefix=f"lmflow-{step_id}") as pool:
            for unit in chunk.units:
                while not chunk.slots.acquire(timeout=0.2) and not stopped():
                    pass
                if stopped():
                    count("not started")
                    executor.report(chunk, unit, Ran(started=False))
                    continue
                # with a copy of this context: Prefect's run context (its logger), the run's
                pool.submit(contextvars.copy_context().run, one, unit)
                # (a slot taken while stopping is not released: nothing starts after a stop)
            chunk.dispatched.set()
    finally:
        chunk.dispatched.set()
    return counts


class PrefectResults:
    """lmflow's step cache for a chunk's items: Prefect's result store, under the keys an item's
    own task run uses, so a run at either grain reuses the other's answers."""

    def __init__(self, recorder: RunRecorder):
        from prefect.results import get_result_store

        self.store = get_result_store()
        self.recorder = recorder

    def read(self, key: str) -> StepResult | None:
        try:
            if not self.store.exists(key):
                return None
            found = self.store.read(key).result
        except Exception:  # noqa: BLE001 - a damaged or half-written entry is computed again
            return None
        return found if isinstance(found, StepResult) else None

    def write(self, key: str, result: StepResult, ttl: float | None) -> None:
        try:
            self.store.write(result, key=key, expiration=_expiration(ttl))
        except OSError as exc:  # a full disk: the answer stands; its journal line answers next time
            self.recorder.emit("warning", message=f"the step cache could not keep an answer: {exc}")

    @staticmethod
    def cached(key: str, result: StepResult, ttl: float | None) -> Any:
        """What a unit's own task run returns for an answer its run's journal gave (the store had
        lost it): a Cached state, whose result Prefect keeps under `key` again, with what is left
        of its time to live (`ttl`, not one that starts now)."""
        from prefect.results import get_result_store
        from prefect.states import Completed

        record = get_result_store().create_result_record(result, key=key, expiration=_expiration(ttl))
        return Completed(name="Cached", data=record)


def _expiration(ttl: float | None) -> Any:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc) + timedelta(seconds=ttl) if ttl else None


@task(task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def join_units(name: str) -> None:
    """A map step's node in Prefect's graph: its items lead to it, its dependents leave from it."""


@task(task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def skipped_step(name: str, reason: str) -> Any:
    """A step that did not run (its condition was false, or a step it needs failed): its node in
    Prefect's graph, so the graph is the whole spec, in a Completed state named Skipped."""
    from prefect.states import Completed

    return Completed(name="Skipped", message=f"skipped: {reason}")


class PrefectExecutor:
    """Units as Prefect task runs, with their step's retries, timeouts and cache (lmflow.engine's
    `Executor`). One task per step, made once; a unit whose cached answer must not be used is
    submitted with `refresh_cache`."""

    def __init__(self, recorder: RunRecorder | None = None) -> None:
        #: the run's recorder (None: a task worker's, which sends no chunk elsewhere)
        self.recorder = recorder
        self._remote: RemoteChunks | None = None
        self._tasks: dict[str, Any] = {}
        #: what finished, as it finishes: (unit, its task's future) or (a chunk's unit, Ran)
        self._done: queue.SimpleQueue[tuple[Unit, Any]] = queue.SimpleQueue()
        #: chunks submitted, until their task run takes them
        self.chunks: dict[str, Chunk] = {}
        self._reported: dict[int, set[int]] = {}  # id(chunk) -> id(unit) of the units reported
        self._lock = threading.Lock()

    def _task(self, unit: Unit) -> Any:
        task_ = self._tasks.get(unit.step.id)
        if task_ is None:
            task_ = self._tasks[unit.step.id] = _step_task(unit.step)
        return task_.with_options(refresh_cache=True) if unit.refresh else task_

    def submit(self, unit: Unit, after: Sequence[Any]) -> None:
        future = self._task(unit).submit(unit.name, unit.step.id, unit.options, unit.index, unit.key,
                                         wait_for=after)
        future.wrapped_future.add_done_callback(lambda _: self._done.put((unit, future)))

    def submit_chunk(self, chunk: Chunk, after: Sequence[Any]) -> None:
        self._reported[id(chunk)] = set()
        if chunk.step.distribute:  # to a task worker, wherever it runs (no edge: see distributed.py)
            self._remote_chunks().submit(chunk)
            return
        self.chunks[chunk.name] = chunk
        future = chunk.edge = run_chunk.submit(chunk.name, chunk.step.id, wait_for=after)
        future.wrapped_future.add_done_callback(lambda done: self._chunk_over(chunk, done))

    def _remote_chunks(self) -> RemoteChunks:
        if self._remote is None:
            from .distributed import RemoteChunks

            assert self.recorder is not None
            self._remote = RemoteChunks(self.recorder, self.report, self._forget)
        return self._remote

    def close(self) -> None:
        """The run is over or stopping: chunks out on task workers start no more items."""
        if self._remote is not None:
            self._remote.close()

    def _forget(self, chunk: Chunk) -> None:
        with self._lock:
            self._reported.pop(id(chunk), None)

    def report(self, chunk: Chunk, unit: Unit, ran: Ran) -> None:
        """A chunk's unit is over: once, whatever reports it first (its thread, or the chunk's end)."""
        with self._lock:
            reported = self._reported.get(id(chunk))
            if reported is None or id(unit) in reported:
                return
            reported.add(id(unit))
        self._done.put((unit, ran))

    def _chunk_over(self, chunk: Chunk, done: Any) -> None:
        """Units a chunk did not report (its task run failed or never started) fail with its reason."""
        self.chunks.pop(chunk.name, None)
        if done.cancelled():
            state, why = None, "its task run was cancelled"
        elif done.exception() is not None:
            state, why = None, str(done.exception())
        else:
            state = done.result()
            why = state.message or state.name
        error = None if state is not None and state.is_completed() else RuntimeError(
            f"chunk {chunk.name} ended without running this item: {why}")
        chunk.dispatched.set()  # (one that never ran must not hold up the next)
        for unit in chunk.units:
            self.report(chunk, unit, Ran(error=error) if error else Ran(started=False))
        self._forget(chunk)

    def wait(self) -> list[tuple[Unit, Ran]]:
        finished = [self._done.get()]
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                break
        # a unit's final State from its future itself (asking the API could lag behind)
        return [(unit, got if isinstance(got, Ran) else _ran(got.wrapped_future.result(), got))
                for unit, got in finished]

    def call(self, unit: Unit) -> Ran:
        state = self._task(unit)(unit.name, unit.step.id, unit.options, unit.index, unit.key,
                                 return_state=True)
        return _ran(state, None)

    def join(self, name: str, after: Sequence[Any]) -> Any:
        """A task run named after the map that waits for its completed items: the map's node in
        Prefect's graph, and the one edge its dependents wait for. Over before this returns."""
        future = join_units.submit(name, wait_for=after)
        future.wait()
        return future

    def skip(self, name: str, reason: str, after: Sequence[Any]) -> Any:
        """A task run in the state Skipped for a step that does not run; over before this returns."""
        future = skipped_step.submit(name, reason, wait_for=after)
        future.wait()
        return future

    def publish(self, step_id: str, markdown: str) -> None:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=_artifact_key(step_id), description=step_id)

    def track(self, step_id: str, description: str) -> Any:
        from prefect.artifacts import create_progress_artifact

        return create_progress_artifact(0.0, key=_artifact_key(step_id) + "-progress",
                                        description=description)

    def advance(self, handle: Any, percent: float) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(handle, percent)


def _ran(state: Any, edge: Any) -> Ran:
    if state.is_completed():
        return Ran(result=state.result(), cached=state.name == "Cached", edge=edge)
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        error = RuntimeError(state.message or state.name)
    return Ran(error=error)


def _retry_condition(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry only what can heal (connection, timeout, 5xx, user code), never a 4xx or schema error."""
    exc = state.result(raise_on_failure=False)
    return bool(getattr(exc, "retryable", False))


def _key_from_parameters(_ctx: Any, parameters: dict[str, Any]) -> str | None:
    return parameters.get("cache_key")


def run_spec(spec_path: str, params: dict[str, Any] | None = None,
             refresh_cache: bool = False, max_parallel: int | None = None) -> dict[str, Any]:
    """Run the pipeline described by the spec at `spec_path`.

    A relative path is relative to `LMFLOW_REPO` when it is set (a worker's checkout of the
    repository the deployment names the spec in), else to the working directory.
    """
    owned = _RECORDER.get(None) is None  # run by a deployment, not by `run()`
    if owned:
        if not Path(spec_path).is_absolute() and os.environ.get("LMFLOW_REPO"):
            spec_path = str(Path(os.environ["LMFLOW_REPO"]) / spec_path)
        spec = load_spec(spec_path, params)
        recorder = RunRecorder(spec)
    else:  # `run()` loaded it a moment ago (validation imports the spec's modules: once is enough)
        recorder = _RECORDER.get()
        spec = recorder.spec
    recorder.result.flow_run_id = str(get_run_context().flow_run.id)
    recorder.journal({"flow_run": recorder.result.flow_run_id})  # a kill: the next run marks it Crashed
    _label_flow_run(recorder)
    _mark_killed_runs(recorder)
    # a server other runs use too (not this run's temporary one): a limit per model server they share
    gates = limits.install(spec) if owned or recorder.result.api_url else None
    runtime = Runtime(spec, recorder, gates)
    executor = PrefectExecutor(recorder)
    lifecycle = Lifecycle(runtime, executor, refresh=refresh_cache)
    token = _LIFECYCLE.set(lifecycle)
    try:
        with working_directory(spec.dir, lambda message: recorder.emit("warning", message=message)), \
                runtime:
            release_leftovers(spec, recorder, runtime.server_backend)
            try:
                Scheduler(lifecycle, max_parallel or spec.max_parallel).run()
            finally:
                runtime.stopping.set()  # user code still running stops being waited for
                executor.close()
    finally:
        _LIFECYCLE.reset(token)
        _summarize(recorder)
        if owned:
            recorder.save()
    failures = recorder.result.failures
    if failures:
        raise StepFailed(failures[0])
    return recorder.result.outputs()


#: the one flow of every spec. Its function is a module attribute of its own (`run_spec`), so
#: Prefect's serve and workers pickle it by reference (a Flow under the function's own name
#: would be pickled by value, with this module's context variables, and fail)
lmflow_flow = flow(name="lmflow", persist_result=False, validate_parameters=False,
                   task_runner=ThreadPoolTaskRunner(max_workers=POOL_SIZE))(run_spec)


def _label_flow_run(recorder: RunRecorder) -> None:
    """Name the flow run after the run's id and tag it with the spec's name and version, so a run
    started by a schedule or a worker reads like one from `lmflow run` and can be traced to the
    exact spec it ran."""
    from prefect.client.orchestration import get_client

    result = recorder.result
    flow_run = get_run_context().flow_run
    tags = sorted({*(flow_run.tags or ()), *result.tags()})
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=result.run_id, tags=tags)
    except Exception as exc:  # noqa: BLE001 - labels are a convenience; the run goes on
        recorder.emit("warning", message=f"could not label the flow run in Prefect: {exc}")


def _mark_killed_runs(recorder: RunRecorder) -> None:
    """Killed runs of this spec on this machine: Crashed in Prefect, not Running for good."""
    from prefect.client.orchestration import get_client

    from ..engine.recovery import killed_journals
    from .history import mark_killed_runs

    if not killed_journals(recorder.spec.name, marker="crash_marked"):
        return  # the common case: no client opened at the start of every run
    try:
        with get_client(sync_client=True) as client:
            marked = mark_killed_runs(client, recorder.spec.name)
    except Exception as exc:  # noqa: BLE001 - the run goes on; the next command tries again
        recorder.emit("warning", message=f"could not mark killed runs as crashed in Prefect: {exc}")
        return
    for run_id in marked:
        recorder.emit("warning", message=f"the run {run_id} was killed: marked Crashed in Prefect")


def _summarize(recorder: RunRecorder) -> None:
    """The run's table in Prefect's UI (one API call, also when steps failed): a row per step,
    errors whole (lmflow.render.history). `lmflow runs` and `lmflow runs show` read it
    (lmflow.prefect.history)."""
    from prefect.artifacts import create_table_artifact

    from ..render.history import summary_description, summary_rows
    from .history import summary_key

    result = recorder.result
    try:
        create_table_artifact(summary_rows(result), key=summary_key(result.name),
                              description=summary_description(result))
    except Exception as exc:  # noqa: BLE001 - the summary is a convenience; the run's outcome stands
        recorder.emit("warning", message=f"could not write the run's summary to Prefect: {exc}")


def _step_task(step: StepSpec) -> Any:
    """`run_step` with the step's retries and cache; its task runs are named after their unit."""
    policy = step.policy
    kind = get_kind(step.kind)
    # kinds that retry their model calls per link (with fallbacks) are not retried again as a whole
    retries = 0 if kind.retries_inside else policy.retries
    settings: dict[str, Any] = {
        "name": step.id,
        "task_run_name": "{name}",
        "retries": retries,
        "retry_delay_seconds": policy.retry_delays() if retries else 0,
        "retry_condition_fn": _retry_condition,
    }
    if policy.cache and kind.cacheable:
        settings.update(cache_key_fn=_key_from_parameters, persist_result=True,
                        cache_expiration=timedelta(seconds=policy.cache_ttl) if policy.cache_ttl else None)
    else:
        settings.update(cache_policy=NO_CACHE, persist_result=False)
    return run_step.with_options(**settings)


def _artifact_key(step_id: str) -> str:
    """Prefect artifact keys are lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in step_id.lower()).strip("-") or "step"


def _no_heartbeat_wait() -> AbstractContextManager[Any]:
    """Skip the flow heartbeat thread unless the user configured it.

    Every flow run joins that thread at its end, and it sleeps in 1 s steps:
    ~0.9 s added to every run. What it buys (the server marking a SIGKILLed
    run as crashed) is not worth that per run for local pipelines; set
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY to get it back.
    """
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ:
        return nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _drain(timeout: float = 10.0) -> None:
    """Send queued logs and events (task run states) before the API may go away."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def _cause(state: Any) -> BaseException | str:
    """What ended a flow run that did not complete: its exception, else Prefect's message."""
    try:
        cause = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a state without its result (a crash): its message will do
        cause = None
    return cause if isinstance(cause, BaseException) else (state.message or state.name)


def _flow_stopped(recorder: RunRecorder, cause: BaseException | str) -> None:
    """The flow died outside any step's own error handling (Prefect's machinery, a failed setup, a
    signal): the run's error names the cause, and no step is left looking as if it still ran."""
    if isinstance(cause, (KeyboardInterrupt, SystemExit)):
        recorder.result.error = f"the run was {_interruption(cause)}; what finished is kept (a re-run " \
                                "reuses the cached steps and items)"
    else:
        if isinstance(cause, BaseException):
            cause = str(cause) if isinstance(cause, LmflowError) else f"{type(cause).__name__}: {cause}"
        recorder.result.error = f"the flow stopped: {cause} (`lmflow run -v` shows Prefect's traceback)"
    for record in recorder.result.steps:  # the table and the record, not the progress: the run is over
        if record.status == "running":
            record.status, record.reason = "interrupted", "the flow stopped while it ran"
        elif record.status == "pending":
            record.status, record.reason = "skipped", "the flow stopped before it started"


def run(spec_path: str | Path | Spec, params: dict[str, Any] | None = None, *,
        refresh_cache: bool = False, listener: Listener | None = None,
        verbose: bool = False, max_parallel: int | None = None) -> RunResult:
    """Validate, compile and run a spec (a path, or a spec already loaded with these params);
    returns every step's record (never raises StepFailed)."""
    # before Prefect: spec errors cost nothing
    spec = spec_path if isinstance(spec_path, Spec) else load_spec(spec_path, params)
    choice = configure_environment(verbose)
    recorder = RunRecorder(spec, listener)
    recorder.result.api_url = choice.url
    recorder.emit("run_starting", spec=spec, api=choice, max_parallel=max_parallel or spec.max_parallel)
    token = _RECORDER.set(recorder)
    try:
        named = lmflow_flow.with_options(name=spec.name, flow_run_name=recorder.result.run_id)
        with _no_heartbeat_wait():
            state = named(str(spec.file), params, refresh_cache, max_parallel, return_state=True)
        if not state.is_completed():
            cause = _cause(state)
            if not isinstance(cause, StepFailed):  # failed steps are reported as such
                _flow_stopped(recorder, cause)
    except LmflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - the run's top level: what stopped the flow is its error
        _flow_stopped(recorder, exc)
    except (KeyboardInterrupt, SystemExit) as exc:  # recorded as such, then on its way up
        _flow_stopped(recorder, exc)
        raise
    finally:
        _RECORDER.reset(token)
        try:
            recorder.save()  # RecordNotWritten on a full disk: the run's one error
        finally:
            _drain()
            recorder.emit("run_finished", result=recorder.result)
    return recorder.result


def _interruption(exc: BaseException) -> str:
    """What interrupted a run, in words (the CLI turns SIGTERM into SystemExit(128 + 15))."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 128:
        import signal

        try:
            return f"interrupted by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT (Ctrl-C)"
    return f"interrupted (exit {code})"

