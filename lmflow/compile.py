"""Spec -> Prefect flow. The only module that imports Prefect's flow machinery.

`lmflow_flow` is one top-level, importable flow that takes the spec's path, so
a deployment can re-import it by name; `run()` gives it the spec's name for
the UI. A scheduler in the flow's thread starts every step whose dependencies
have finished, at most `max_parallel` task runs at once (Prefect's
ThreadPoolTaskRunner); a map step's items are task runs `step[i]` in a sliding
window. Each task run waits for (`wait_for`) the task runs of the steps it
depends on, so Prefect's graph is the spec's graph. See docs/dataflow.md.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from . import shared_limit
from .errors import LmflowError, StepFailed, StepFailure
from .prefect_server import configure_environment
from .runtime import Listener, RunRecorder, RunResult, Runtime, working_directory
from .spec import load_spec
from .spec.model import Spec, StepSpec
from .steps import StepResult, get_kind

_RUNTIME: contextvars.ContextVar[Runtime] = contextvars.ContextVar("lmflow_runtime")
_RECORDER: contextvars.ContextVar[RunRecorder] = contextvars.ContextVar("lmflow_recorder")
#: the pool's ceiling; the scheduler keeps at most the spec's max_parallel task runs in flight,
#: so only that many threads are ever created
POOL_SIZE = 256


@task(persist_result=True)
def run_step(step_id: str, kind: str, options: dict[str, Any], index: int | None = None,
             cache_key: str | None = None) -> StepResult:
    """One step of a spec, or one item of a map step (task runs `step` / `step[i]`)."""
    runtime = _RUNTIME.get()
    result = runtime.execute(runtime.spec.step(step_id), options, index)
    if result.errors:  # in Prefect's history too: what failed before an answer came
        from prefect.logging import get_run_logger

        logger = get_run_logger()
        for error in result.errors:
            attempt = f" (attempt {error['attempt']})" if error.get("attempt") else ""
            logger.warning(f"{error['target']}{attempt}: {error['error_type']}: {error['message']}")
        if result.answered_by:
            logger.warning(f"answered by {result.answered_by['target']}")
    return result


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
    runtime = Runtime(spec, recorder)
    runtime.refresh = refresh_cache
    runtime.nested = _nested_runner(runtime, refresh_cache)
    runtime.publish = _publish
    token = _RUNTIME.set(runtime)
    try:
        if owned or recorder.result.api_url:  # a server other runs use too, not this run's temporary one
            runtime.gates = shared_limit.install(spec)
        with working_directory(spec.dir, lambda message: recorder.emit("warning", message=message)), \
                runtime:
            runtime.release_leftovers()
            try:
                Scheduler(runtime, refresh_cache, max_parallel or spec.max_parallel).run()
            finally:
                runtime.stopping.set()  # user code still running stops being waited for
    finally:
        _RUNTIME.reset(token)
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

    from .history import mark_killed_runs
    from .runtime import killed_journals

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
    errors whole. `lmflow runs` and `lmflow runs show` read it (lmflow.history)."""
    from prefect.artifacts import create_table_artifact

    from . import history

    result = recorder.result
    try:
        create_table_artifact(history.summary_rows(result), key=history.summary_key(result.name),
                              description=history.summary_description(result))
    except Exception as exc:  # noqa: BLE001 - the summary is a convenience; the run's outcome stands
        recorder.emit("warning", message=f"could not write the run's summary to Prefect: {exc}")


_SKIPPED = object()  # an item whose condition was false, or that failed with on_item_error: skip


@dataclass
class _Map:
    """A map step in progress: its items, the window of items in flight, their outcomes."""

    step: StepSpec
    items: list[Any]
    window: int
    started: float
    outputs: list[Any] = field(default_factory=list)
    next: int = 0
    in_flight: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("completed", "cached", "failed", "skipped"), 0))
    problems: list[dict[str, Any]] = field(default_factory=list)
    first_failure: StepFailure | None = None
    artifact_id: Any = None
    reported: float = 0.0

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def progress(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.started, 1e-6)
        rate = self.done / elapsed
        left = len(self.items) - self.done
        return {"total": len(self.items), "done": self.done, **self.counts,
                "rate": round(rate, 2), "eta": round(left / rate, 1) if rate else None}


@dataclass
class _Unit:
    step: StepSpec
    index: int | None
    key: str | None  # its cache key (None: not cached)
    started: float


class Scheduler:
    """Starts ready steps and map items, at most `max_parallel` task runs at once; records outcomes.

    Runs in the flow's thread only: its own state needs no lock. Readiness is counted
    (each step knows how many of its dependencies are unfinished), so a 1,000-step
    spec costs O(steps + edges), not a scan of every waiting step per event.
    """

    def __init__(self, runtime: Runtime, refresh_cache: bool, max_parallel: int):
        self.runtime = runtime
        self.recorder = runtime.recorder
        self.refresh = refresh_cache
        self.max_parallel = max_parallel
        steps = runtime.spec.steps  # dependencies first
        self.unfinished = {s.id: len(s.depends_on) for s in steps}
        self.dependents: dict[str, list[StepSpec]] = {}
        for s in steps:
            for dep in s.depends_on:
                self.dependents.setdefault(dep, []).append(s)
        self.ready: list[StepSpec] = [s for s in steps if not s.depends_on]
        self.status: dict[str, str] = {}  # done | failed | skipped (condition) | blocked (upstream)
        #: started steps with units left to submit, in the order they became ready
        self.queue: dict[str, StepSpec] = {}
        #: resolved options and cache key of steps waiting for a slot
        self.singles: dict[str, tuple[dict[str, Any], str | None]] = {}
        self.maps: dict[str, _Map] = {}
        self.futures: dict[str, list[Any]] = {}  # each step's task runs: the edges of its dependents
        self.running: dict[concurrent.futures.Future, tuple[_Unit, Any]] = {}
        self.tasks: dict[str, Any] = {}

    # -- the loop ---------------------------------------------------------

    def run(self) -> None:
        while True:
            if self.recorder.write_error is not None:  # a full disk: start nothing it cannot record
                if not self.running:
                    return
            else:
                while self.ready:
                    ready, self.ready = self.ready, []
                    for step in ready:
                        self._start(step)
                self._fill()
                if self.ready:  # a map whose items were all skipped finished while filling
                    continue
            if not self.running:
                if len(self.status) < len(self.unfinished):  # cannot happen: validation rejects cycles
                    raise RuntimeError("lmflow scheduler stalled: "
                                       + ", ".join(s for s in self.unfinished if s not in self.status))
                return
            done, _ = concurrent.futures.wait(list(self.running),
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for wrapped in done:
                unit, future = self.running.pop(wrapped)
                self._finished(unit, future)

    def _settle(self, step: StepSpec, status: str) -> None:
        """A step is over (done, failed, skipped or blocked): its dependents may become ready."""
        self.status[step.id] = status
        for dependent in self.dependents.get(step.id, ()):
            self.unfinished[dependent.id] -= 1
            if self.unfinished[dependent.id] == 0:
                self.ready.append(dependent)

    def _start(self, step: StepSpec) -> None:
        blocked = next((d for d in step.depends_on if self.status[d] in ("failed", "blocked")), None)
        if blocked is not None:
            reason = self.recorder.record(blocked).reason or ""
            cause = reason.removeprefix("upstream failed: ") if reason.startswith("upstream") else blocked
            self.recorder.update(step.id, status="skipped", reason=f"upstream failed: {cause}")
            self._settle(step, "blocked")
            return
        started = time.perf_counter()
        runtime = self.runtime
        try:
            if not runtime.item_condition(step) and not runtime.condition(step):
                runtime.set_output(step.id, None)
                self.recorder.update(step.id, status="skipped", reason="condition false")
                self._settle(step, "skipped")
                return
            if step.foreach is None:
                options = runtime.resolve(step)
                self.singles[step.id] = (options, self._key(step, options))
            else:
                items = runtime.items(step)
                self.recorder.update(step.id, status="running")
                if not items:
                    self.recorder.emit("warning", step=step.id,
                                       message="foreach has no items: the output is an empty list")
                    self._complete(step, [], seconds=0.0, items={"total": 0})
                    return
                self.maps[step.id] = _Map(step, items, step.parallel or self.max_parallel, started,
                                          outputs=[_SKIPPED] * len(items))
                self._progress_artifact(self.maps[step.id])
        except Exception as exc:  # noqa: BLE001 - a template, condition or dataset error fails the step
            self._fail(step, runtime.failure(step, exc), time.perf_counter() - started)
            return
        self.queue[step.id] = step

    def _fill(self) -> None:
        """Submit units, earlier steps first, while fewer than max_parallel run."""
        for step in list(self.queue.values()):
            if len(self.running) >= self.max_parallel:
                return
            if step.id in self.singles:
                del self.queue[step.id]
                self.recorder.update(step.id, status="running")
                self._submit(step, None, *self.singles.pop(step.id))
                continue
            batch = self.maps[step.id]
            while (len(self.running) < self.max_parallel and batch.in_flight < batch.window
                   and batch.next < len(batch.items) and batch.first_failure is None):
                index = batch.next
                batch.next += 1
                self._submit_item(batch, index)
            if batch.next >= len(batch.items) or batch.first_failure is not None:
                del self.queue[step.id]
                if batch.in_flight == 0:
                    self._finish_map(batch)

    def _submit_item(self, batch: _Map, index: int) -> None:
        step, item = batch.step, batch.items[index]
        try:
            if self.runtime.item_condition(step) and not self.runtime.condition(step, item, index):
                self._item_done(batch, index, "skipped", reason="condition false")
                return
            options = self.runtime.resolve(step, item, index)
            key = self._key(step, options)
        except Exception as exc:  # noqa: BLE001 - a bad item fails alone (on_item_error decides)
            self._item_failed(batch, index, self.runtime.failure(step, exc, index), 0.0)
            return
        batch.in_flight += 1
        self._submit(step, index, options, key)

    def _key(self, step: StepSpec, options: dict[str, Any]) -> str | None:
        """The step's (or item's) cache key; it resolves the models it names, so it can fail (a
        `probed` size with no probe) like resolving a template: the step fails, not the run."""
        if not (step.policy.cache and get_kind(step.kind).cacheable):
            return None
        return self.runtime.cache_key(step, options)

    def _submit(self, step: StepSpec, index: int | None, options: dict[str, Any], key: str | None) -> None:
        task_ = self._task(step)
        if key is not None and (self.refresh or _degraded(key).exists()):
            # an answer that came from a fallback is not reused: the next run asks again
            task_ = task_.with_options(refresh_cache=True)
        upstream = [f for dep in step.depends_on for f in self.futures.get(dep, ())]
        future = task_.submit(step.id, step.kind, options, index, key, wait_for=upstream)
        self.running[future.wrapped_future] = (_Unit(step, index, key, time.perf_counter()), future)

    def _task(self, step: StepSpec) -> Any:
        """The step's task, made once: retries, cache and the name of its task runs."""
        if step.id not in self.tasks:
            self.tasks[step.id] = _step_task(step, step.id if step.foreach is None else step.id + "[{index}]")
        return self.tasks[step.id]

    # -- outcomes ---------------------------------------------------------

    def _finished(self, unit: _Unit, future: Any) -> None:
        state = future.wrapped_future.result()  # the final State (asking the API could lag behind)
        seconds = round(time.perf_counter() - unit.started, 3)
        step = unit.step
        batch = self.maps.get(step.id) if unit.index is not None else None
        if batch is not None:
            batch.in_flight -= 1
        if state.is_completed():
            # an edge for the dependents' task runs. Only completed ones: Prefect would refuse to
            # start a task run that waits for a failed one (NotReady), and a map that skips or
            # collects its failed items hands its dependents an output all the same
            self.futures.setdefault(step.id, []).append(future)
            result: StepResult = state.result()
            cached = state.name == "Cached"
            if unit.key is not None and not cached:
                if result.degraded:
                    _degraded(unit.key).touch()
                else:
                    _degraded(unit.key).unlink(missing_ok=True)
            if batch is None:
                self._complete(step, result.output, seconds=seconds, result=result, cached=cached)
            else:
                self._item_done(batch, unit.index, "cached" if cached else "completed",  # type: ignore[arg-type]
                                output=result.output, seconds=seconds)
            return
        exc = state.result(raise_on_failure=False)
        if not isinstance(exc, BaseException):
            exc = RuntimeError(state.message or state.name)
        failure = self.runtime.failure(step, exc, unit.index)
        if batch is None:
            self._fail(step, failure, seconds)
        else:
            self._item_failed(batch, unit.index, failure, seconds)  # type: ignore[arg-type]

    def _complete(self, step: StepSpec, output: Any, *, seconds: float, result: StepResult | None = None,
                  cached: bool = False, items: dict[str, int] | None = None,
                  problems: list[dict[str, Any]] | None = None) -> None:
        self.runtime.set_output(step.id, output)
        changes: dict[str, Any] = {"status": "cached" if cached else "completed", "output": output,
                                   "seconds": seconds}
        if result is not None:
            changes.update(meta=result.meta, answered_by=result.answered_by, errors=result.errors)
            if result.artifact:  # a report for the UI (a probe's table)
                from prefect.artifacts import create_markdown_artifact

                create_markdown_artifact(result.artifact, key=_artifact_key(step.id), description=step.id)
        if items is not None:
            changes.update(items=items, item_problems=problems or [])
        self.recorder.update(step.id, **changes)
        self._settle(step, "done")

    def _fail(self, step: StepSpec, failure: StepFailure, seconds: float,
              items: dict[str, int] | None = None, problems: list[dict[str, Any]] | None = None) -> None:
        changes: dict[str, Any] = {"status": "failed", "error": failure, "seconds": round(seconds, 3)}
        if items is not None:
            changes.update(items=items, item_problems=problems or [])
        self.recorder.update(step.id, **changes)
        self._settle(step, "failed")

    def _item_done(self, batch: _Map, index: int, status: str, *, output: Any = _SKIPPED,
                   seconds: float = 0.0, reason: str | None = None) -> None:
        batch.counts[status] += 1
        if status in ("completed", "cached"):
            batch.outputs[index] = output
        else:
            batch.problems.append({"index": index, "status": status, "reason": reason})
        self.recorder.item(batch.step.id, index, status, output=None if output is _SKIPPED else output,
                           reason=reason, seconds=seconds, progress=batch.progress())
        self._report_progress(batch)
        if batch.in_flight == 0 and batch.step.id not in self.queue and batch.step.id not in self.status:
            self._finish_map(batch)

    def _item_failed(self, batch: _Map, index: int, failure: StepFailure, seconds: float) -> None:
        mode = batch.step.on_item_error
        batch.counts["failed"] += 1
        batch.problems.append({"index": index, "status": "failed", "error_type": failure.error_type,
                               "reason": failure.message, "attempts": failure.attempts})
        if mode == "collect":
            batch.outputs[index] = None
        elif mode == "fail" and batch.first_failure is None:
            batch.first_failure = failure
        self.recorder.item(batch.step.id, index, "failed", error=failure, seconds=seconds,
                           progress=batch.progress())
        self._report_progress(batch)
        if batch.in_flight == 0 and batch.step.id not in self.queue and batch.step.id not in self.status:
            self._finish_map(batch)

    def _finish_map(self, batch: _Map) -> None:
        step = batch.step
        if step.id in self.status:
            return
        self.maps.pop(step.id, None)  # its items are no longer needed
        seconds = time.perf_counter() - batch.started
        counts = {"total": len(batch.items), **batch.counts}
        self._report_progress(batch, final=True)
        if batch.first_failure is not None:
            first = batch.first_failure
            not_run = len(batch.items) - batch.done
            message = (f"item {first.step.removeprefix(step.id).strip('[]')} failed: {first.message} "
                       f"({batch.counts['failed']} of {len(batch.items)} items failed"
                       + (f", {not_run} not started" if not_run else "")
                       + "; on_item_error: skip or collect keeps going)")
            failure = StepFailure(step=step.id, error_type=first.error_type, message=message,
                                  attempts=first.attempts, retryable=first.retryable, extra=first.extra)
            self._fail(step, failure, seconds, counts, batch.problems)
            return
        output = [o for o in batch.outputs if o is not _SKIPPED]
        self._complete(step, output, seconds=round(seconds, 3), items=counts, problems=batch.problems,
                       cached=batch.counts["cached"] == len(batch.items))

    # -- progress in Prefect's UI ------------------------------------------

    def _progress_artifact(self, batch: _Map) -> None:
        from prefect.artifacts import create_progress_artifact

        batch.artifact_id = create_progress_artifact(
            0.0, key=_artifact_key(batch.step.id) + "-progress",
            description=f"{batch.step.id}: {len(batch.items)} items")
        batch.reported = time.perf_counter()

    def _report_progress(self, batch: _Map, final: bool = False) -> None:
        """At most once a second (and at the end): each update is an API call."""
        now = time.perf_counter()
        if batch.artifact_id is None or (not final and now - batch.reported < 1.0):
            return
        from prefect.artifacts import update_progress_artifact

        batch.reported = now
        update_progress_artifact(batch.artifact_id, 100.0 * batch.done / max(len(batch.items), 1))


def _step_task(step: StepSpec, run_name: str) -> Any:
    """`run_step` with the step's retries, cache and the name of its task runs."""
    policy = step.policy
    kind = get_kind(step.kind)
    # kinds that retry their model calls per link (with fallbacks) are not retried again as a whole
    retries = 0 if kind.retries_inside else policy.retries
    settings: dict[str, Any] = {
        "name": step.id,
        "task_run_name": run_name,
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


def _nested_runner(runtime: Runtime, refresh: bool) -> Any:
    """Runs a loop checkpoint's step as a task run of its own (`evolve@5.advise`) inside the loop's."""

    def run(step: StepSpec, options: dict[str, Any], name: str) -> StepResult:
        kind = get_kind(step.kind)
        key = runtime.cache_key(step, options) if step.policy.cache and kind.cacheable else None
        task_ = _step_task(step, name)
        if refresh and key is not None:
            task_ = task_.with_options(refresh_cache=True)
        state = task_(step.id, step.kind, options, None, key, return_state=True)
        if state.is_completed():
            return state.result()
        exc = state.result(raise_on_failure=False)
        raise exc if isinstance(exc, BaseException) else RuntimeError(state.message or state.name)

    return run


def _publish(step_id: str, markdown: str) -> None:
    """A step's report in Prefect's UI (a new version of the artifact each time)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=_artifact_key(step_id), description=step_id)


def _degraded(key: str) -> Path:
    """Marks a step cache key whose answer came from a fallback link."""
    from .home import subdir

    return subdir("degraded") / key


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

