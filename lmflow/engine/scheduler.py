"""Which units are ready, and how many run at once: steps in dependency order, map items in a window.

The scheduler starts every step whose dependencies have finished and hands its units to
the `Lifecycle` (lmflow.engine.unit), which prepares them and submits them to the run's
`Executor`; at most `max_parallel` units are in flight. A map step's items are units
`step[i]` in a sliding window, each submitted alone (grain `item`) or in chunks of many
(`step[a:b]`, two chunks of a map in flight, their items sharing the map's window): the
grain is chosen here (`grain`), by the map's size unless the step says. Each unit waits
for the steps it depends on (their edges: a step's unit, or the one join of a map's
completed items), so the executor's graph (Prefect's) is the spec's graph, and a map over a
map's output costs O(items).
See docs/dataflow.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import StepFailure
from ..spec.model import StepSpec
from .outputs import NOTHING, OutputWriter
from .unit import Chunk, Executor, Lifecycle, Outcome, Ran, Unit

#: `grain: auto`: maps of up to this many items run an item per unit (a task run each in the UI)
AUTO_ITEMS = 100
#: chunks of a map in flight at once: while one drains, the next fills the window
CHUNKS_IN_FLIGHT = 2


#: a distributed map's chunks out at once (each worker takes a few at a time; the rest wait in
#: Prefect's queue, so a worker that frees up starts its next chunk without a round trip)
DISTRIBUTED_CHUNKS_IN_FLIGHT = 8


def chunk_size(step: StepSpec, items: int, window: int) -> int | None:
    """Items per chunk for this map, or None for a unit per item (a distributed map: always chunks)."""
    if step.grain == "item" or (step.grain == "auto" and items <= AUTO_ITEMS and not step.distribute):
        return None
    if isinstance(step.grain, int):
        return step.grain
    if step.distribute:  # a chunk's trip through Prefect's queue costs ~0.5 s: enough work to carry it
        return min(1000, max(-(-items // 100), 16 * window))
    # about 100 chunks, each large enough to keep the window full, none above 1,000 items
    return min(1000, max(-(-items // 100), 4 * window))


@dataclass
class _Map:
    """A map step in progress: its items, the window of items in flight, their outcomes."""

    step: StepSpec
    items: Sequence[Any]  # a list, or a dataset's rows read when asked for (lmflow.datasets)
    window: int
    started: float
    #: where its items' outputs go, in input order (lmflow.engine.outputs)
    outputs: OutputWriter | None = None
    next: int = 0
    in_flight: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("completed", "cached", "failed", "skipped"), 0))
    problems: list[dict[str, Any]] = field(default_factory=list)
    first_failure: StepFailure | None = None
    progress_handle: Any = None
    reported: float = 0.0
    #: items per chunk (None: a unit per item); the window its chunks' items share
    chunk: int | None = None
    slots: threading.BoundedSemaphore | None = None
    chunks_in_flight: int = 0
    #: what its chunks hold of max_parallel while any runs (its window)
    held: int = 0
    last_chunk: Chunk | None = None
    #: set at its first failure with on_item_error: fail (its chunks start no more items)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def progress(self) -> dict[str, Any]:
        """Counts, and the rate and time left over the items computed in this run: a resumed map's
        cached items (and skipped ones) come back at once and would promise far too soon an end."""
        elapsed = max(time.perf_counter() - self.started, 1e-6)
        rate = (self.counts["completed"] + self.counts["failed"]) / elapsed
        left = len(self.items) - self.done
        return {"total": len(self.items), "done": self.done, **self.counts,
                "rate": round(rate, 2), "eta": round(left / rate, 1) if rate else None}


class Scheduler:
    """Starts ready steps and map items, at most `max_parallel` units at once; records outcomes.

    Runs in one thread only (the flow's): its own state needs no lock. Readiness is counted
    (each step knows how many of its dependencies are unfinished), so a 1,000-step
    spec costs O(steps + edges), not a scan of every waiting step per event.
    """

    def __init__(self, lifecycle: Lifecycle, max_parallel: int):
        self.lifecycle = lifecycle
        self.runtime = lifecycle.runtime
        self.executor: Executor = lifecycle.executor
        self.recorder = self.runtime.recorder
        self.max_parallel = max_parallel
        steps = self.runtime.spec.steps  # dependencies first
        self.unfinished = {s.id: len(s.depends_on) for s in steps}
        self.dependents: dict[str, list[StepSpec]] = {}
        for s in steps:
            for dep in s.depends_on:
                self.dependents.setdefault(dep, []).append(s)
        self.ready: list[StepSpec] = [s for s in steps if not s.depends_on]
        self.status: dict[str, str] = {}  # done | failed | skipped (condition) | blocked (upstream)
        #: started steps with units left to submit, in the order they became ready
        self.queue: dict[str, StepSpec] = {}
        #: prepared units of steps (not maps) waiting for a slot
        self.singles: dict[str, Unit] = {}
        self.maps: dict[str, _Map] = {}
        #: what each step's dependents wait for: its unit's edge, or the join of a map's items
        self.edges: dict[str, list[Any]] = {}
        self.edge_ids: set[int] = set()  # (a chunk's items share their chunk's edge: it is added once)
        self.in_flight = 0

    # -- the loop ---------------------------------------------------------

    def run(self) -> None:
        while True:
            if self.recorder.write_error is not None:  # a full disk: start nothing it cannot record
                if not self.in_flight:
                    return
            else:
                while self.ready:
                    ready, self.ready = self.ready, []
                    for step in ready:
                        self._start(step)
                self._fill()
                if self.ready:  # a map whose items were all skipped finished while filling
                    continue
            if not self.in_flight:
                if len(self.status) < len(self.unfinished):  # cannot happen: validation rejects cycles
                    raise RuntimeError("lmflow scheduler stalled: "
                                       + ", ".join(s for s in self.unfinished if s not in self.status))
                return
            for unit, ran in self.executor.wait():
                self._finished(unit, ran)

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
            self._show_skipped(step, f"upstream failed: {cause}")
            self._settle(step, "blocked")
            return
        runtime, lifecycle = self.runtime, self.lifecycle
        names = runtime.names(step)
        if step.foreach is None:
            prepared = lifecycle.prepare(step, names)
            if isinstance(prepared, Unit):
                self.singles[step.id] = prepared
                self.queue[step.id] = step
            elif prepared.status == "skipped":
                self._skip(step)
            else:
                assert prepared.failure is not None
                self._fail(step, prepared.failure, 0.0)
            return
        started = time.perf_counter()
        try:
            if not runtime.item_condition(step) and not lifecycle.condition(step, names):
                self._skip(step)
                return
            items = runtime.items(step)
        except Exception as exc:  # noqa: BLE001 - a condition or dataset error fails the step
            self._fail(step, lifecycle.failure(step, exc, step.id), time.perf_counter() - started)
            return
        self.recorder.update(step.id, status="running")
        if not items:
            self.recorder.emit("warning", step=step.id,
                               message="foreach has no items: the output is an empty list")
            self._complete(step, [], seconds=0.0, items={"total": 0}, inputs=[])
            return
        window = step.parallel or self.max_parallel
        batch = _Map(step, items, window, started, outputs=self.recorder.output_writer(step.id),
                     chunk=chunk_size(step, len(items), window))
        if batch.chunk is not None:
            batch.slots = threading.BoundedSemaphore(min(window, self.max_parallel))
        batch.progress_handle = self.executor.track(step.id, f"{step.id}: {len(items)} items")
        batch.reported = time.perf_counter()
        self.maps[step.id] = batch
        self.queue[step.id] = step

    def _skip(self, step: StepSpec) -> None:
        self.runtime.set_output(step, None)
        self._show_skipped(step, "condition false")
        self._settle(step, "skipped")

    def _show_skipped(self, step: StepSpec, reason: str) -> None:
        """Recorded, and a node of its own where the run is watched, that its dependents lead from."""
        self.recorder.update(step.id, status="skipped", reason=reason)
        edge = self.executor.skip(step.id, reason, self._upstream(step))
        if edge is not None:
            self.edges[step.id] = [edge]

    def _fill(self) -> None:
        """Submit units, earlier steps first, while fewer than max_parallel run."""
        for step in list(self.queue.values()):
            batch = self.maps.get(step.id)
            # a chunked map holds its window's share of max_parallel while its chunks run: its
            # next chunk may start whatever the rest holds (its items share that window)
            holding = batch is not None and batch.chunks_in_flight > 0
            if self.in_flight >= self.max_parallel and not holding:
                continue
            if step.id in self.singles:
                del self.queue[step.id]
                self.recorder.update(step.id, status="running")
                self._submit(self.singles.pop(step.id))
                continue
            assert batch is not None
            if batch.chunk is not None:
                while ((batch.chunks_in_flight > 0 or self.in_flight < self.max_parallel)
                       and batch.chunks_in_flight < (DISTRIBUTED_CHUNKS_IN_FLIGHT if step.distribute
                                                     else CHUNKS_IN_FLIGHT)
                       and batch.next < len(batch.items) and batch.first_failure is None):
                    self._submit_chunk(batch)
            while (batch.chunk is None and self.in_flight < self.max_parallel
                   and batch.in_flight < batch.window and batch.next < len(batch.items)
                   and batch.first_failure is None):
                index = batch.next
                batch.next += 1
                self._submit_item(batch, index)
            if batch.next >= len(batch.items) or batch.first_failure is not None:
                del self.queue[step.id]
                if batch.in_flight == 0:
                    self._finish_map(batch)

    def _prepare_item(self, batch: _Map, index: int) -> Unit | None:
        """The item's unit; None when it does not run (skipped, or failed before it ran: recorded)."""
        step = batch.step
        prepared = self.lifecycle.prepare(step, self.runtime.names(step, batch.items[index], index),
                                          index=index, when=self.runtime.item_condition(step))
        if isinstance(prepared, Outcome):
            if prepared.failure is not None:  # a bad item fails alone (on_item_error decides)
                self._item_failed(batch, index, prepared.failure, 0.0)
            else:
                self._item_done(batch, index, "skipped", reason=prepared.reason)
            return None
        return prepared

    def _submit_item(self, batch: _Map, index: int) -> None:
        unit = self._prepare_item(batch, index)
        if unit is not None:
            batch.in_flight += 1
            self._submit(unit)

    def _submit_chunk(self, batch: _Map) -> None:
        """The map's next `chunk` items as one chunk (those that do not run are recorded at once)."""
        assert batch.chunk is not None and batch.slots is not None
        start = batch.next
        end = batch.next = min(start + batch.chunk, len(batch.items))
        units = [u for u in (self._prepare_item(batch, i) for i in range(start, end)) if u is not None]
        if not units:
            return
        step = batch.step
        chunk = Chunk(step, f"{step.id}[{start}:{end}]", units, batch.slots,
                      width=min(batch.window, self.max_parallel, len(units)), stop=batch.stop,
                      previous=batch.last_chunk)
        batch.last_chunk = chunk
        batch.in_flight += len(units)
        if batch.chunks_in_flight == 0:  # its items in flight count against max_parallel
            batch.held = min(batch.window, self.max_parallel)
            self.in_flight += batch.held
        batch.chunks_in_flight += 1
        self.lifecycle.submit_chunk(chunk, self._upstream(step))

    def _submit(self, unit: Unit) -> None:
        self.lifecycle.submit(unit, self._upstream(unit.step))
        self.in_flight += 1

    def _upstream(self, step: StepSpec) -> list[Any]:
        return [edge for dep in step.depends_on for edge in self.edges.get(dep, ())]

    # -- outcomes ---------------------------------------------------------

    def _finished(self, unit: Unit, ran: Ran) -> None:
        step, chunk = unit.step, unit.chunk
        batch = self.maps.get(step.id) if unit.index is not None else None
        if batch is not None:
            batch.in_flight -= 1
        if chunk is None:
            self.in_flight -= 1
        else:
            chunk.left -= 1
            if chunk.left == 0 and batch is not None:
                batch.chunks_in_flight -= 1
                if batch.chunks_in_flight == 0:
                    self.in_flight -= batch.held
                    batch.held = 0
            if not ran.started:  # its map stopped at a failure first: counted as not started
                if batch is not None and batch.in_flight == 0 and step.id not in self.queue:
                    self._finish_map(batch)
                return
        outcome = self.lifecycle.finish(unit, ran)
        options = unit.options
        if chunk is not None:  # its chunk keeps it to the chunk's end: not its options (its prompts)
            unit.options = {}
        if outcome.ok:
            # an edge for the dependents' units. Only completed ones: Prefect would refuse to
            # start a task run that waits for a failed one (NotReady), and a map that skips or
            # collects its failed items hands its dependents an output all the same
            # (a chunk's items: the chunk's task run, once)
            edge = outcome.edge if chunk is None else chunk.edge
            if edge is not None and id(edge) not in self.edge_ids:
                self.edge_ids.add(id(edge))
                self.edges.setdefault(step.id, []).append(edge)
            result = outcome.result
            assert result is not None
            reuse = self.lifecycle.reusable(unit, outcome)
            if batch is None:
                self._complete(step, result.output, seconds=outcome.seconds, result=result,
                               cached=outcome.status == "cached", reuse=reuse)
            else:
                self._item_done(batch, unit.index, outcome.status,  # type: ignore[arg-type]
                                output=result.output, seconds=outcome.seconds, answered_by=result.answered_by,
                                errors=result.errors, reuse=reuse)
            return
        assert outcome.failure is not None
        if batch is None:
            self._fail(step, outcome.failure, outcome.seconds)
        else:
            self._item_failed(batch, unit.index, outcome.failure, outcome.seconds,  # type: ignore[arg-type]
                              options=options)

    def _complete(self, step: StepSpec, output: Any, *, seconds: float, result: Any = None,
                  cached: bool = False, items: dict[str, int] | None = None,
                  problems: list[dict[str, Any]] | None = None, inputs: Sequence[Any] | None = None,
                  reuse: dict[str, Any] | None = None) -> None:
        self.runtime.set_output(step, output, inputs)
        changes: dict[str, Any] = {"status": "cached" if cached else "completed", "output": output,
                                   "seconds": seconds}
        if result is not None:
            changes.update(meta=result.meta, answered_by=result.answered_by, errors=result.errors)
            if result.artifact:  # a report for the UI (a probe's table)
                self.executor.publish(step.id, result.artifact)
        if items is not None:
            changes.update(items=items, item_problems=problems or [])
        self.recorder.update(step.id, reuse=reuse, **changes)
        self._settle(step, "done")

    def _fail(self, step: StepSpec, failure: StepFailure, seconds: float,
              items: dict[str, int] | None = None, problems: list[dict[str, Any]] | None = None) -> None:
        changes: dict[str, Any] = {"status": "failed", "error": failure, "seconds": round(seconds, 3)}
        if items is not None:
            changes.update(items=items, item_problems=problems or [])
        self.recorder.update(step.id, **changes)
        self._settle(step, "failed")

    def _item_done(self, batch: _Map, index: int, status: str, *, output: Any = NOTHING,
                   seconds: float = 0.0, reason: str | None = None, answered_by: str | None = None,
                   errors: list[Any] | None = None, reuse: dict[str, Any] | None = None) -> None:
        batch.counts[status] += 1
        assert batch.outputs is not None
        batch.outputs.put(index, output if status in ("completed", "cached") else NOTHING)
        # an item whose condition is false is counted, not listed nor journaled: `when: index < 3`
        # over a big dataset would write a line for each of its rows
        self.recorder.item(batch.step.id, index, status, output=None if output is NOTHING else output,
                           reason=reason, seconds=seconds, progress=batch.progress(),
                           journal=status != "skipped", answered_by=answered_by, errors=errors, reuse=reuse)
        self._report_progress(batch)
        if batch.in_flight == 0 and batch.step.id not in self.queue and batch.step.id not in self.status:
            self._finish_map(batch)

    def _item_failed(self, batch: _Map, index: int, failure: StepFailure, seconds: float,
                     options: dict[str, Any] | None = None) -> None:
        mode = batch.step.on_item_error
        batch.counts["failed"] += 1
        batch.problems.append({"index": index, "status": "failed", "error_type": failure.error_type,
                               "reason": failure.message, "attempts": failure.attempts})
        assert batch.outputs is not None
        batch.outputs.put(index, None if mode == "collect" else NOTHING)
        if mode == "fail" and batch.first_failure is None:
            batch.first_failure = failure
            batch.stop.set()  # its chunks start no more items
        self.recorder.item(batch.step.id, index, "failed", error=failure, seconds=seconds,
                           progress=batch.progress(), options=options)
        self._report_progress(batch)
        if batch.in_flight == 0 and batch.step.id not in self.queue and batch.step.id not in self.status:
            self._finish_map(batch)

    def _finish_map(self, batch: _Map) -> None:
        step = batch.step
        if step.id in self.status:
            return
        self.maps.pop(step.id, None)  # its items are no longer needed
        if hasattr(batch.items, "close"):  # a dataset file
            batch.items.close()
        seconds = time.perf_counter() - batch.started
        counts = {"total": len(batch.items), **batch.counts}
        batch.problems.sort(key=lambda problem: problem["index"])  # in input order, as they finished
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
            assert batch.outputs is not None
            batch.outputs.discard()
            return
        assert batch.outputs is not None
        output, inputs = batch.outputs.close(), batch.outputs.inputs(batch.items)
        if step.id in self.dependents:  # they wait for one edge, not for every item
            self.edges[step.id] = [self.executor.join(step.id, self.edges.get(step.id, []))]
        self._complete(step, output, seconds=round(seconds, 3), items=counts, problems=batch.problems,
                       cached=batch.counts["cached"] == len(batch.items), inputs=inputs)

    def _report_progress(self, batch: _Map, final: bool = False) -> None:
        """At most once a second (and at the end): each update may be an API call."""
        now = time.perf_counter()
        if batch.progress_handle is None or (not final and now - batch.reported < 1.0):
            return
        batch.reported = now
        self.executor.advance(batch.progress_handle, 100.0 * batch.done / max(len(batch.items), 1))
