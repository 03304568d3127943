"""The life of one unit of work, wherever it stands: here and nowhere else.

A unit is a top-level step, one item of a map step, or one step of a loop's checkpoint.
Whoever asks for it (the scheduler, a loop), it goes through the same stages:

1. condition: `when` decides whether it runs (skipped: "condition false"; a `when` that
   cannot be evaluated fails the unit, with the same message everywhere);
2. options: its templates resolved and checked against its kind's schema;
3. cache key, and whether the cache may answer: not with `--refresh`, and not when the
   answer cached under the key came from a fallback link (the next run asks again);
4. submission to an `Executor`, which calls `attempt` once per try (the executor owns
   retries and the cache, from the step's policy) or answers from its cache; a map's
   items may go as chunks (`Chunk`: one executor task for many items), and then each
   item's tries and cache are `attempts` here, with the same policy. Where the cache has
   lost an answer (a full disk), what an unfinished run journaled under the key answers
   (`reused`, lmflow.engine.recovery.JournaledAnswers), and is kept in the cache again;
5. outcome: completed, cached, failed (its error shaped into a `StepFailure` that counts
   the unit's own attempts) or skipped; the fallback marker is set or cleared, and what
   its journal line holds for a later run to reuse it (`reusable`).

Where an outcome is recorded is the asker's: a step's record and a map's item lines (the
scheduler), a checkpoint's analysis (`Outcome.summary`, the loop).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import jsonl
from ..datasets import BrokenRow
from ..errors import ExpressionError, FailedElsewhere, LmflowError, StepFailure, TemplateError, describe
from ..steps import StepContext, StepResult, get_kind
from .recovery import JournaledAnswers

if TYPE_CHECKING:
    from ..spec.model import StepSpec
    from .runtime import Runtime


@dataclass
class Unit:
    """One unit ready to run: its options resolved, its cache key known."""

    step: StepSpec
    #: its name in records and the UI: `step`, `step[3]`, `loop@5.step`
    name: str
    options: dict[str, Any]
    index: int | None = None  # a map item's place in its list
    key: str | None = None  # None: never answered from the cache
    #: the cache must not answer (--refresh, or the cached answer came from a fallback)
    refresh: bool = False
    started: float = field(default_factory=time.perf_counter)
    #: the chunk it runs in (None: a unit of its own)
    chunk: Chunk | None = None


@dataclass(eq=False)
class Chunk:
    """Items of one map that meet the executor as one task (`step[a:b]`); each item keeps its own
    attempts, cache, outcome and record. The executor reports every unit of it exactly once."""

    step: StepSpec
    name: str
    units: list[Unit]
    #: the map's items in flight, shared by its chunks (its window)
    slots: threading.BoundedSemaphore
    width: int
    #: set when the map stops starting items (its first failure with on_item_error: fail)
    stop: threading.Event = field(default_factory=threading.Event)
    #: the map's chunk before this one: its items start first (a map's items start in order)
    previous: Chunk | None = None
    #: set once every item of it has started (or will not)
    dispatched: threading.Event = field(default_factory=threading.Event)
    #: units not yet reported back (the scheduler counts them down)
    left: int = 0
    #: the executor's handle of its task run: what units depending on its items wait for
    edge: Any = None


class ResultCache(Protocol):
    """Where a chunk's items find and keep their answers (the executor's step cache)."""

    def read(self, key: str) -> StepResult | None:
        """The answer kept under `key`, or None (none, expired or unreadable)."""

    def write(self, key: str, result: StepResult, ttl: float | None) -> None:
        """Keep an answer; a failed write is a warning, never the item's failure."""


@dataclass
class Ran:
    """What an executor reports of one unit: its result, or the error of its last attempt."""

    result: StepResult | None = None
    error: BaseException | None = None
    cached: bool = False
    #: what units depending on this one wait for (the executor's handle of it)
    edge: Any = None
    #: False for a chunk's unit that was never started (its map stopped first)
    started: bool = True


@dataclass
class Outcome:
    """How a unit ended."""

    name: str
    status: str  # completed | cached | failed | skipped
    result: StepResult | None = None
    failure: StepFailure | None = None
    reason: str | None = None  # why it was skipped
    seconds: float = 0.0
    options: dict[str, Any] | None = None
    edge: Any = None

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "cached")

    @property
    def output(self) -> Any:
        return self.result.output if self.result is not None else None

    def summary(self) -> dict[str, Any]:
        """The outcome as a checkpoint's analysis records each of its steps."""
        if self.status == "skipped":
            return {"status": "skipped", "reason": self.reason}
        if self.failure is not None:
            return {"status": "failed", "error_type": self.failure.error_type,
                    "message": self.failure.message, "attempts": self.failure.attempts,
                    "seconds": self.seconds}
        result = self.result
        assert result is not None
        return {"status": self.status, "output": result.output, "options": self.options,
                "meta": result.meta, "answered_by": result.answered_by, "errors": result.errors,
                "seconds": self.seconds}


class Executor(Protocol):
    """Where units run (Prefect task runs under `lmflow run`): the engine's one way out."""

    def submit(self, unit: Unit, after: Sequence[Any]) -> None:
        """Start the unit once the units whose edges are `after` have completed."""

    def wait(self) -> list[tuple[Unit, Ran]]:
        """Block until at least one submitted unit is over; every one that is."""

    def call(self, unit: Unit) -> Ran:
        """Run a unit in this thread (a checkpoint's step, inside its loop's own unit)."""

    def submit_chunk(self, chunk: Chunk, after: Sequence[Any]) -> None:
        """Start a chunk once `after` have completed; `wait` reports each of its units."""

    def join(self, name: str, after: Sequence[Any]) -> Any:
        """One edge that stands for many (a map's items, once they are over): what the map's
        dependents wait for, so that a chain of maps costs O(items), not O(items^2)."""

    def skip(self, name: str, reason: str, after: Sequence[Any]) -> Any:
        """Show a step that does not run, and why, where the run is watched; its edge."""

    def publish(self, step_id: str, markdown: str) -> None:
        """A step's report where the run is watched (a new version each time)."""

    def track(self, step_id: str, description: str) -> Any:
        """Start showing a map's progress; a handle for `advance`."""

    def advance(self, handle: Any, percent: float) -> None:
        """Show how far a map has come."""


class Lifecycle:
    """The one place that decides what happens to a unit (see the module's docstring).

    Shared by the scheduler's thread and the executor's worker threads: attempts are
    counted under a lock; everything else it holds is read-only during the run.
    """

    def __init__(self, runtime: Runtime, executor: Executor, *, refresh: bool = False):
        self.runtime = runtime
        self.executor = executor
        #: recompute cached units, and start loops afresh instead of resuming them
        self.refresh = refresh
        self.journaled = JournaledAnswers(runtime.spec.name)
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- before it runs ------------------------------------------------------

    def condition(self, step: StepSpec, names: dict[str, Any]) -> bool:
        """Whether `when` lets the unit run; True without a condition."""
        if step.when is None or isinstance(step.when, bool):
            return step.when is not False
        try:
            return step.when.test(names)
        except ExpressionError as exc:
            raise TemplateError(f"when: {exc.message}") from None

    def key(self, step: StepSpec, options: dict[str, Any]) -> str:
        """The hash of everything that changes the unit's answer (also of one that is not cached:
        a loop names its resumable state with it)."""
        return self.runtime.cache_key(step, options)

    def prepare(self, step: StepSpec, names: dict[str, Any], *, name: str | None = None,
                index: int | None = None, when: bool = True) -> Unit | Outcome:
        """The unit with its options and key; or its outcome when it does not run (its condition is
        false, or a reference, the condition or its key cannot be resolved: it fails alone).
        `when=False`: the condition was decided for the whole step already."""
        name = name or (step.id if index is None else f"{step.id}[{index}]")
        try:
            if isinstance(names.get("item"), BrokenRow):  # a dataset row that could not be read
                raise names["item"].error()
            if when and not self.condition(step, names):
                return Outcome(name, "skipped", reason="condition false")
            options = self.runtime.resolve(step, names=names)
            # a key resolves the models it names, so it can fail (a `probed` size with no probe)
            key = self.key(step, options) if step.policy.cache and get_kind(step.kind).cacheable else None
        except Exception as exc:  # noqa: BLE001 - a bad unit fails alone
            return Outcome(name, "failed", failure=self.failure(step, exc, name))
        # an answer that came from a fallback is not reused: the next run asks again
        refresh = key is not None and (self.refresh or _degraded(key).exists())
        return Unit(step, name, options, index, key, refresh)

    def reused(self, key: str | None) -> tuple[StepResult, float | None] | None:
        """Where the step cache has no answer under `key`: the one an unfinished run journaled, and
        the seconds it has left to live (None: no limit). None with --refresh, and when the latest
        answer under the key came from a fallback link (as the cache would not answer)."""
        if key is None or self.refresh:
            return None
        found = self.journaled.get(key)
        return None if found is None or _degraded(key).exists() else found

    def submit(self, unit: Unit, after: Sequence[Any] = ()) -> None:
        unit.started = time.perf_counter()
        self.executor.submit(unit, after)

    def submit_chunk(self, chunk: Chunk, after: Sequence[Any] = ()) -> None:
        chunk.left = len(chunk.units)
        for unit in chunk.units:
            unit.chunk = chunk
        self.executor.submit_chunk(chunk, after)

    # -- while it runs (in the executor's worker) -------------------------------

    def attempt(self, step: StepSpec, options: dict[str, Any], name: str,
                index: int | None = None) -> StepResult:
        """One try of a unit: what the executor calls, once per attempt."""
        from .runtime import CURRENT_STEP

        token = CURRENT_STEP.set(name)
        try:
            with self._lock:
                attempts = self._attempts[name] = self._attempts.get(name, 0) + 1
                if index is None and step.parent is None:  # live in the step's record
                    self.runtime.recorder.record(step.id).attempts = attempts
            recorder = self.runtime.recorder
            ctx = StepContext(step_id=name, spec_dir=self.runtime.spec.dir, session=self.runtime,
                              policy=step.policy, stopping=self.runtime.stopping, step=step, units=self,
                              emit=lambda event, data: recorder.emit(event, step=name, **data))
            return get_kind(step.kind).run(options, ctx)
        finally:
            CURRENT_STEP.reset(token)

    def attempts(self, unit: Unit, cache: ResultCache) -> Ran:
        """A chunk's unit, in this thread: its cached answer, or its tries with its step's retries
        (those that can heal, after the step's delays) and the answer kept for the next run.
        What an executor's own task does for a unit of its own (Prefect's retries and cache)."""
        unit.started = time.perf_counter()
        step, policy = unit.step, unit.step.policy
        if unit.key is not None and not unit.refresh:
            hit = cache.read(unit.key)
            if hit is not None:
                return Ran(result=hit, cached=True)
            found = self.reused(unit.key)
            if found is not None:  # the cache lost it: kept there again, for what it has left to live
                cache.write(unit.key, *found)
                return Ran(result=found[0], cached=True)
        retries = 0 if get_kind(step.kind).retries_inside else policy.retries
        delays = policy.retry_delays()
        tried = 0
        while True:
            try:
                result = self.attempt(step, unit.options, unit.name, unit.index)
            except Exception as exc:  # noqa: BLE001 - the unit's error, shaped by `finish`
                if tried < retries and getattr(exc, "retryable", False) \
                        and not self.runtime.stopping.wait(delays[tried]):
                    tried += 1
                    continue
                return Ran(error=exc)
            if unit.key is not None:
                cache.write(unit.key, result, policy.cache_ttl)
            return Ran(result=result)

    # -- after it ran ----------------------------------------------------------

    def finish(self, unit: Unit, ran: Ran) -> Outcome:
        seconds = round(time.perf_counter() - unit.started, 3)
        if ran.error is None and ran.result is not None:
            with self._lock:
                self._attempts.pop(unit.name, None)
            if unit.key is not None and not ran.cached:
                marker = _degraded(unit.key)
                if ran.result.degraded:
                    marker.touch()
                else:
                    marker.unlink(missing_ok=True)
            return Outcome(unit.name, "cached" if ran.cached else "completed", result=ran.result,
                           seconds=seconds, options=unit.options, edge=ran.edge)
        error = ran.error if ran.error is not None else RuntimeError("the unit ended without a result")
        return Outcome(unit.name, "failed", failure=self.failure(unit.step, error, unit.name),
                       seconds=seconds, options=unit.options)

    def reusable(self, unit: Unit, outcome: Outcome) -> dict[str, Any] | None:
        """What a completed unit's journal line holds for a later run to reuse its answer if the step
        cache loses it (`reused`): its key, and when it expires. None when it is not to be reused:
        not cached, from a fallback link, with a report (not journaled), JSON that would not read
        back as it was, or a cached answer with a time to live (its expiry is the stored one's,
        not known here; the journal that gave it, if one did, still holds it)."""
        result, ttl = outcome.result, unit.step.policy.cache_ttl
        if unit.key is None or result is None or result.degraded or result.artifact is not None \
                or (ttl and outcome.status == "cached"):
            return None
        if not jsonl.exact(result.output) or (unit.index is None and not jsonl.exact(result.meta)):
            return None  # (a map item's line has no meta: a step's own does)
        return {"key": unit.key, "expires": round(time.time() + ttl, 3)} if ttl else {"key": unit.key}

    def failure(self, step: StepSpec, exc: BaseException, name: str) -> StepFailure:
        """An error shaped for the record: its type, message, the unit's attempts, what to retry."""
        if isinstance(exc, FailedElsewhere):  # shaped where it ran (a task worker)
            with self._lock:
                self._attempts.pop(name, None)
            return replace(exc.failure, step=name)
        extra = {}
        if getattr(exc, "url", None):
            extra["url"] = exc.url  # type: ignore[attr-defined]
        for attribute in ("status", "n_prompt", "n_ctx", "errors"):
            if getattr(exc, attribute, None) is not None:
                extra[attribute] = getattr(exc, attribute)
        message = str(exc) if isinstance(exc, LmflowError) else describe(exc)
        with self._lock:
            counted = self._attempts.pop(name, 0)
        attempts = getattr(exc, "attempts", None) or counted
        return StepFailure(step=name, error_type=type(exc).__name__, message=message,
                           attempts=max(attempts, 1), retryable=bool(getattr(exc, "retryable", False)),
                           extra=extra)

    # -- what a kind holding steps of its own uses (the Step contract's `units`) ---

    def run(self, step: StepSpec, names: dict[str, Any], name: str) -> Outcome:
        """A nested unit (a loop's checkpoint step) from start to outcome, in this thread."""
        prepared = self.prepare(step, names, name=name)
        if isinstance(prepared, Outcome):
            return prepared
        prepared.started = time.perf_counter()
        return self.finish(prepared, self.executor.call(prepared))

    def names(self, extra: dict[str, Any], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """What nested steps refer to: params, the top-level steps' outputs and those of the nested
        steps that ran before (`outputs`), and the kind's own names (`extra`, e.g. `loop`)."""
        return self.runtime.nested_names(extra, outputs or {})

    def publish(self, step_id: str, markdown: str) -> None:
        self.executor.publish(step_id, markdown)


def _degraded(key: str) -> Path:
    """Marks a cache key whose answer came from a fallback link."""
    from ..home import subdir

    return subdir("degraded") / key

