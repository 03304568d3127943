"""Spec -> Prefect flow. The only module that imports Prefect's flow machinery.

`lmflow_flow` is one top-level, importable flow that takes the spec's path, so
a deployment can re-import it by name; `run()` gives it the spec's name for
the UI. Each step is one task run named by its id, with the step's retries,
backoff, timeout and a cache key made of the step id and its resolved config.
"""

from __future__ import annotations

import contextvars
import os
import time
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from .errors import StepFailed, StepFailure
from .prefect_server import configure_environment
from .runtime import Listener, RunRecorder, RunResult, Runtime
from .spec import load_spec
from .spec.templates import TemplateError
from .steps import get_kind

_RUNTIME: contextvars.ContextVar[Runtime] = contextvars.ContextVar("lmflow_runtime")
_RECORDER: contextvars.ContextVar[RunRecorder] = contextvars.ContextVar("lmflow_recorder")


@task(persist_result=True)
def run_step(step_id: str, kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """One step of a spec (its task run is named after the step id)."""
    runtime = _RUNTIME.get()
    result = runtime.execute(runtime.spec.step(step_id), options)
    errors = result.meta.get("errors") or []
    if errors:  # in Prefect's history too: what failed before an answer came
        from prefect.logging import get_run_logger

        logger = get_run_logger()
        for error in errors:
            attempt = f" (attempt {error['attempt']})" if error.get("attempt") else ""
            logger.warning(f"{error['target']}{attempt}: {error['error_type']}: {error['message']}")
        logger.warning(f"answered by {result.meta['answered_by']['target']}")
    return {"output": result.output, "meta": result.meta}


def _retry_condition(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry only what can heal (connection, timeout, 5xx, user code), never a 4xx or schema error."""
    exc = state.result(raise_on_failure=False)
    return bool(getattr(exc, "retryable", False))


@flow(name="lmflow", persist_result=False, validate_parameters=False)
def lmflow_flow(spec_path: str, params: dict[str, Any] | None = None,
                refresh_cache: bool = False) -> dict[str, Any]:
    """Run the pipeline described by the spec at `spec_path`."""
    spec = load_spec(spec_path, params)
    owned = _RECORDER.get(None) is None  # run by a deployment, not by `run()`
    recorder = _RECORDER.get(None) or RunRecorder(spec)
    recorder.result.flow_run_id = str(get_run_context().flow_run.id)
    runtime = Runtime(spec, recorder)
    token = _RUNTIME.set(runtime)
    failure: StepFailure | None = None
    try:
        with runtime:
            for step in spec.steps:
                if failure is not None:
                    recorder.update(step.id, status="skipped")
                    continue
                failure = _run_one(runtime, recorder, step, refresh_cache)
    finally:
        _RUNTIME.reset(token)
        if owned:
            recorder.save()
    if failure is not None:
        raise StepFailed(failure)
    return recorder.result.outputs()


def _run_one(runtime: Runtime, recorder: RunRecorder, step: Any,
             refresh_cache: bool) -> StepFailure | None:
    started = time.perf_counter()
    recorder.update(step.id, status="running")
    try:
        options = runtime.resolve(step)
    except TemplateError as exc:
        failure = StepFailure(step.id, "TemplateError", str(exc))
        recorder.update(step.id, status="failed", error=failure,
                        seconds=round(time.perf_counter() - started, 3))
        return failure
    policy = step.policy
    kind = get_kind(step.kind)
    # kinds that retry their model calls per link (with fallbacks) are not retried again as a whole
    retries = 0 if kind.retries_inside else policy.retries
    settings: dict[str, Any] = {
        "name": step.id,
        "retries": retries,
        "retry_delay_seconds": policy.retry_delays() if retries else 0,
        "retry_condition_fn": _retry_condition,
        # the HTTP call enforces each attempt's timeout itself; this backstop catches
        # user code and anything else that hangs
        "timeout_seconds": _backstop(runtime, step, options) + 5,
    }
    key: str | None = None
    if policy.cache and get_kind(step.kind).cacheable:
        key = runtime.cache_key(step, options)
        settings.update(
            cache_key_fn=lambda _ctx, _params: key, persist_result=True,
            # an answer that came from a fallback is not reused: the next run asks again
            refresh_cache=refresh_cache or _degraded(key).exists(),
            cache_expiration=timedelta(seconds=policy.cache_ttl) if policy.cache_ttl else None,
        )
    else:
        settings.update(cache_policy=NO_CACHE, persist_result=False)
    state = run_step.with_options(**settings)(step.id, step.kind, options, return_state=True)
    seconds = round(time.perf_counter() - started, 3)
    if state.is_completed():
        value = state.result()
        runtime.outputs[step.id] = value["output"]
        markdown = value["meta"].pop("artifact", None)
        if markdown:  # a report for the UI (a probe's table)
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(markdown, key=_artifact_key(step.id), description=step.id)
        if key is not None and state.name != "Cached":
            answered = value["meta"].get("answered_by") or {}
            if answered.get("link"):
                _degraded(key).touch()
            else:
                _degraded(key).unlink(missing_ok=True)
        recorder.update(step.id, status="cached" if state.name == "Cached" else "completed",
                        output=value["output"], meta=value["meta"], seconds=seconds)
        return None
    exc = state.result(raise_on_failure=False)
    if not isinstance(exc, BaseException):
        exc = RuntimeError(state.message or state.name)
    failure = runtime.failure(step, exc)
    recorder.update(step.id, status="failed", error=failure, seconds=seconds)
    return failure


def _degraded(key: str) -> Path:
    """Marks a step cache key whose answer came from a fallback link."""
    from .home import subdir

    return subdir("degraded") / key


def _backstop(runtime: Runtime, step: Any, options: dict[str, Any]) -> float:
    """The longest a step may take: every attempt of every link of its chain, with their waits."""
    policy = step.policy
    kind = get_kind(step.kind)
    if not kind.retries_inside:
        return policy.timeout
    links = kind.links(options, runtime.spec.models)  # type: ignore[attr-defined]
    per_model = sum(policy.attempt_timeout(n) for n in range(1, policy.retries + 2)) + sum(
        d * 1.5 for d in policy.retry_delays())
    return sum(per_model if link.kind == "model" else policy.timeout for link in links)


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


def run(spec_path: str | Path, params: dict[str, Any] | None = None, *,
        refresh_cache: bool = False, listener: Listener | None = None,
        verbose: bool = False) -> RunResult:
    """Validate, compile and run a spec; returns every step's record (never raises StepFailed)."""
    spec = load_spec(spec_path, params)  # before Prefect: spec errors cost nothing
    choice = configure_environment(verbose)
    recorder = RunRecorder(spec, listener)
    recorder.result.api_url = choice.url
    recorder.emit("run_starting", spec=spec, api=choice)
    token = _RECORDER.set(recorder)
    try:
        named = lmflow_flow.with_options(name=spec.name, flow_run_name=recorder.result.run_id)
        with _no_heartbeat_wait():
            state = named(str(spec.file), params, refresh_cache, return_state=True)
        if not state.is_completed() and recorder.result.failure is None:
            recorder.result.error = state.message or state.name
    finally:
        _RECORDER.reset(token)
        recorder.save()
        _drain()
    recorder.emit("run_finished", result=recorder.result)
    return recorder.result
