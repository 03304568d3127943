"""A run's record and its journal: what each step and map item did, written as it happens.

`RunRecorder` appends every change to `runs/<run_id>.jsonl` at once and writes the whole
record, `runs/<run_id>.json`, when the run ends; `read_record` reads either, rebuilding a
killed run's record from its journal. `RunResult` is what `lmflow.run` returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import jsonl
from ..errors import HistoryError, RecordNotWritten, StepFailure
from ..home import subdir
from ..spec.model import Spec
from .outputs import OutputWriter, journal_default, write_json

Listener = Callable[[str, dict[str, Any]], None]


@dataclass
class StepRecord:
    """What happened to one step in one run."""

    id: str
    kind: str
    #: pending | running | completed | cached | failed | skipped
    status: str = "pending"
    seconds: float = 0.0
    attempts: int = 0
    output: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: StepFailure | None = None
    #: why a step was skipped: "condition false" or "upstream failed: ID"
    reason: str | None = None
    #: which link of a fallback chain answered, and what failed before it
    answered_by: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: a map's items: total, completed, cached, failed, skipped
    items: dict[str, int] | None = None
    #: a map's items that failed or were skipped: index, status, reason
    item_problems: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    """The outcome of a run: every step's record, and where to find it in Prefect."""

    spec: str
    name: str
    run_id: str
    steps: list[StepRecord]
    seconds: float = 0.0
    flow_run_id: str | None = None
    api_url: str | None = None
    record_path: str | None = None
    error: str | None = None  # a failure outside any step (e.g. the flow crashed)
    #: what lmflow did on its own or wants you to know (server restarts, clamped contexts)
    events: list[dict[str, Any]] = field(default_factory=list)
    #: response cache hits/misses and answers that came from a fallback
    stats: dict[str, Any] = field(default_factory=dict)
    #: the spec's git commit (None outside git), local changes, content hash (lmflow.provenance)
    spec_version: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def tags(self) -> list[str]:
        """The run's Prefect tags: lmflow, the spec's name and its version."""
        from ..provenance import version_tags

        return version_tags(self.name, self.spec_version) if self.spec_version else ["lmflow"]

    def errors(self) -> list[dict[str, Any]]:
        """Every failed attempt and skipped link, by step (also of steps that answered in the end)."""
        found = []
        for s in self.steps:
            listed = s.errors or (s.error.extra.get("errors") if s.error else None) or []
            found += [{"step": s.id, **e} for e in listed]
            found += [{"step": f"{s.id}[{p['index']}]", "target": "", "error_type": p.get("error_type"),
                       "message": p["reason"], "attempt": p.get("attempts")}
                      for p in s.item_problems if p["status"] == "failed"]
            if s.error and not listed and s.items is None:  # a map's failed items are listed instead
                found.append({"step": s.id, "target": "", "error_type": s.error.error_type,
                              "message": s.error.message, "attempt": s.error.attempts})
        return found

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures

    @property
    def failures(self) -> list[StepFailure]:
        """Every step that failed, in the spec's order."""
        return [s.error for s in self.steps if s.error is not None]

    @property
    def failure(self) -> StepFailure | None:
        return next(iter(self.failures), None)

    def outputs(self) -> dict[str, Any]:
        return {s.id: s.output for s in self.steps if s.status in ("completed", "cached")}


class RunRecorder:
    """Collects step records; every change is appended to the run's journal at once.

    `runs/<run_id>.jsonl` gets one line per step event and per finished map item,
    flushed immediately (O(1) per step, and a kill loses nothing already computed);
    the full record `runs/<run_id>.json` is written atomically when the run ends.
    `read_record()` rebuilds a record from a journal whose run was killed.
    Thread-safe: steps and items finish in worker threads; one lock orders the
    record, the journal and the listener, so lines never interleave.
    """

    def __init__(self, spec: Spec, listener: Listener | None = None):
        self.spec = spec
        self.result = RunResult(
            spec=str(spec.file), name=spec.name, run_id=new_run_id(spec.name),
            steps=[StepRecord(s.id, s.kind) for s in sorted(spec.steps, key=lambda s: s.index)],
        )
        self._records = {r.id: r for r in self.result.steps}
        from ..provenance import spec_version

        self.result.spec_version = spec_version(spec.file)
        self.result.params = spec.params
        runs = subdir("runs")
        self.path = runs / f"{self.result.run_id}.json"
        self.journal_path = runs / f"{self.result.run_id}.jsonl"
        self.result.record_path = str(self.path)
        self.listener = listener
        self.started = time.perf_counter()
        self._lock = threading.RLock()
        #: why a write of the journal or record failed (a full disk); the run then starts nothing new
        self.write_error: str | None = None
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in save()
        self._append({"run": self.result.run_id, "spec": self.result.spec, "name": spec.name,
                      "pid": os.getpid(), "spec_version": self.result.spec_version,
                      "params": self.result.params, "steps": [[s.id, s.kind] for s in self.result.steps]})

    def record(self, step_id: str) -> StepRecord:
        return self._records[step_id]

    def emit(self, event: str, **data: Any) -> None:
        with self._lock:
            if event in ("warning", "server_restarted", "cache_error", "analysis"):
                # (a kind's `line` is for the terminal: the record keeps the data it says)
                entry = {"event": event, **{k: v for k, v in data.items() if k not in ("spec", "line")}}
                self.result.events.append(entry)
                self._append(entry)
            if self.listener:
                try:
                    self.listener(event, data)
                except Exception as exc:  # noqa: BLE001 - an observer (a closed terminal, a pipe
                    # into `head`) must not fail the pipeline it watches: the run goes on unheard
                    self.listener = None
                    entry = {"event": "warning", "message": f"the run's listener failed ({exc!r}): "
                             "the run goes on without telling it"}
                    self.result.events.append(entry)
                    self._append(entry)

    def journal(self, entry: dict[str, Any]) -> None:
        """Append a fact about the run (a model it loaded) that a later run may need."""
        with self._lock:
            self._append(entry)

    def _append(self, entry: dict[str, Any]) -> None:
        if not self._journal.closed:
            try:
                self._journal.write(json.dumps(entry, default=journal_default) + "\n")
                self._journal.flush()
            except OSError as exc:  # the line may be torn: readers skip it, and nothing follows it
                self._write_failed(self.journal_path, exc)

    def _write_failed(self, path: Path, exc: OSError) -> None:
        if self.write_error is None:
            self.write_error = (
                f"cannot write {path}: {exc.strerror or exc}; free space there (or set LMFLOW_HOME to "
                "a disk with room) and run again: what finished before is kept, and reused")
        with contextlib.suppress(OSError):  # its buffer cannot be written either
            self._journal.close()

    def update(self, step_id: str, reuse: dict[str, Any] | None = None, **changes: Any) -> None:
        """A step's record changed: journaled at once, with what a later run needs to reuse its answer
        if the step cache loses it (`reuse`: its cache key, and when it expires)."""
        with self._lock:
            record = self.record(step_id)
            for key, value in changes.items():
                setattr(record, key, value)
            entry = {"step": step_id, "status": record.status}
            if record.status != "running":
                entry.update({k: v for k, v in asdict(record).items() if k not in ("id", "kind", "status")})
            if reuse:
                entry.update(reuse)
            self._append(entry)
            self.emit("step_started" if record.status == "running" else "step_finished", step=record)

    def output_writer(self, step_id: str) -> OutputWriter:
        """Where a map step's item outputs go: `runs/<run>/<step>.jsonl` (lmflow.engine.outputs)."""
        def failed(path: Path, exc: OSError) -> None:
            with self._lock:
                self._write_failed(path, exc)

        return OutputWriter(self.journal_path.with_suffix("") / f"{step_id}.jsonl", failed)

    def item(self, step_id: str, index: int, status: str, *, output: Any = None,
             error: StepFailure | None = None, reason: str | None = None, seconds: float = 0.0,
             progress: dict[str, Any] | None = None, journal: bool = True, answered_by: str | None = None,
             errors: list[Any] | None = None, options: dict[str, Any] | None = None,
             reuse: dict[str, Any] | None = None) -> None:
        """One map item finished (completed, cached, failed or skipped): journaled at once (unless
        `journal` is false: an item whose condition was false), and told to the listener. Its
        options are journaled when it failed (to see what it was asked; a completed item's would
        grow the journal of a big map by its prompts); a completed one's line holds what a later
        run needs to reuse its answer if the step cache loses it (`reuse`: its cache key, when it
        expires)."""
        with self._lock:
            entry: dict[str, Any] = {"step": step_id, "item": index, "status": status, "seconds": seconds}
            if status in ("completed", "cached"):
                entry["output"] = output
            if answered_by:
                entry["answered_by"] = answered_by
            if errors:  # what went wrong before a fallback answered
                entry["errors"] = errors
            if options is not None:
                entry["options"] = options
            if error is not None:
                entry["error"] = asdict(error)
            if reason:
                entry["reason"] = reason
            if reuse:
                entry.update(reuse)
            if journal:
                self._append(entry)
            self.emit("item_finished", step=self.record(step_id), index=index, status=status,
                      progress=progress or {})

    def save(self) -> None:
        """Write the whole record (atomically) and close the journal; RecordNotWritten when a write
        failed (a half-written record is removed, never left to be read)."""
        with self._lock:
            self.result.seconds = round(time.perf_counter() - self.started, 3)
            tmp = self.path.with_suffix(".tmp")
            try:
                with tmp.open("w", encoding="utf-8") as file:  # a map's output row by row from its file
                    write_json(file, asdict(self.result))
                tmp.replace(self.path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                self._write_failed(self.path, exc)
            with contextlib.suppress(OSError):
                self._journal.close()
            if self.write_error is not None:
                self.result.error = self.result.error or self.write_error
                raise RecordNotWritten(self.write_error)


_run_ids: set[str] = set()
_run_ids_lock = threading.Lock()


def new_run_id(name: str) -> str:
    """`NAME-YYYYmmddTHHMMSSZ-PID`, with `-2`, `-3`... for more runs of the spec in that second from
    this process (a served deployment runs its flows in one process), so records never collide."""
    base = f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}"
    with _run_ids_lock:
        if not any(taken.startswith(base) for taken in _run_ids):
            _run_ids.clear()  # only this second's ids can collide
        run_id, n = base, 1
        while run_id in _run_ids or (subdir("runs") / f"{run_id}.jsonl").exists():
            n += 1
            run_id = f"{base}-{n}"
        _run_ids.add(run_id)
    return run_id


def journal_entries(path: Path, warn: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The entries of a run's journal; a line that cannot be read is skipped (lmflow.jsonl)."""
    return jsonl.read(path, warn)


def read_record(path: str | Path) -> dict[str, Any]:
    """A run's record: the final JSON, or rebuilt from the journal of a run that was killed."""
    path = Path(path)
    final = path.with_suffix(".json")
    if final.exists():
        return json.loads(final.read_text())
    steps: dict[str, dict[str, Any]] = {}
    header: dict[str, Any] = {}
    items: dict[str, dict[int, dict[str, Any]]] = {}
    for entry in journal_entries(path.with_suffix(".jsonl")):
        step = entry.get("step")
        if "run" in entry:
            header = entry
            steps = {sid: {"id": sid, "kind": kind, "status": "pending"} for sid, kind in
                     (pair for pair in entry.get("steps") or () if isinstance(pair, list) and len(pair) == 2)
                     if isinstance(sid, str)}
        elif not isinstance(step, str) or step not in steps:
            continue
        elif "item" in entry:
            if isinstance(entry["item"], int):
                items.setdefault(step, {})[entry["item"]] = entry
        else:
            steps[step].update({k: v for k, v in entry.items() if k != "step"})
            steps[step]["id"] = step
    for step_id, finished in items.items():  # a map the kill interrupted: the items it finished
        if steps[step_id].get("status") == "running":
            steps[step_id]["finished_items"] = [finished[i] for i in sorted(finished)]
    return {"run_id": header.get("run"), "spec": header.get("spec"), "name": header.get("name"),
            "spec_version": header.get("spec_version"), "params": header.get("params"),
            "steps": list(steps.values()), "interrupted": True}


def journaled_item(run_id: str, ref: str) -> dict[str, Any]:
    """One map item of a run on this machine, from its journal: `STEP[N]`, or `N` in a run with one
    map. Its status, seconds, output or error, answered_by, and the options of a failed item."""
    match = re.fullmatch(r"(?:(?P<step>[^\s\[\]]+)\[(?P<index>\d+)\]|(?P<alone>\d+))", ref.strip())
    if match is None:
        raise HistoryError(f"--item {ref!r}: give the map's step and the item's index, e.g. --item "
                           "each[12] (or just 12 in a run with one map)")
    step, index = match.group("step"), int(match.group("index") or match.group("alone"))
    journal = subdir("runs") / f"{run_id}.jsonl"
    if not journal.exists():
        raise HistoryError(f"run {run_id} has no journal on this machine ({journal}): an item's detail "
                           "is kept by the machine that ran it")
    maps: dict[str, int] = {}
    found = None
    chunks: list[dict[str, Any]] = []  # of distributed maps: where their items ran
    for entry in journal_entries(journal):
        if "chunk" in entry and isinstance(entry.get("step"), str):
            chunks.append(entry)
        elif "item" in entry and isinstance(entry.get("step"), str):
            maps[entry["step"]] = maps.get(entry["step"], 0) + 1
            if entry["item"] == index and (step is None or entry["step"] == step):
                found = entry
    if not maps:
        raise HistoryError(f"run {run_id} journaled no map items")
    if step is None and len(maps) > 1:
        raise HistoryError(f"run {run_id} has {len(maps)} maps ({', '.join(maps)}): name one, e.g. "
                           f"--item {next(iter(maps))}[{index}]")
    step = step or next(iter(maps))
    if step not in maps:
        raise HistoryError(f"run {run_id} journaled no items of {step!r}; its maps: {', '.join(maps)}")
    if found is None:
        raise HistoryError(f"{step}[{index}] is not in run {run_id}'s journal: it did not run (its "
                           f"condition was false, or the run stopped first; {maps[step]} items of {step} "
                           "are journaled)")
    ran_on = [{"chunk": c["chunk"], "worker": c.get("worker")} for c in chunks
              if c["step"] == step and _in_chunk(c["chunk"], index)]
    return {"step": step, **{k: v for k, v in found.items() if k != "step"},
            **({"chunks": ran_on} if ran_on else {})}


def _in_chunk(name: str, index: int) -> bool:
    """Whether chunk `step[a:b]` (or `step[a:b]#2`, sent again) holds item `index`."""
    match = re.search(r"\[(\d+):(\d+)\](?:#\d+)?$", name)
    return match is not None and int(match.group(1)) <= index < int(match.group(2))


def journaled_chunks(run_id: str) -> dict[str, dict[str, int]]:
    """Of a run on this machine: per distributed map, the chunks each worker took (sent again
    included); empty for a run with none, or no journal here."""
    journal = subdir("runs") / f"{run_id}.jsonl"
    taken: dict[str, dict[str, int]] = {}
    if journal.exists():
        for entry in journal_entries(journal):
            if "chunk" in entry and isinstance(entry.get("step"), str):
                workers = taken.setdefault(entry["step"], {})
                worker = str(entry.get("worker"))
                workers[worker] = workers.get(worker, 0) + 1
    return taken
