"""What a run holds while it runs: its record and journal, backends and models, values and keys.

`Runtime` is the `Session` every step sees (backends, the models the run loaded, the
shared resilience) and what units are made from: the names templates refer to, resolved
options, cache keys. What happens to a unit with them is lmflow.engine.unit's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import glob
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import jsonl, processes
from .backends import Backend, ModelInfo, backend_class, create_backend
from .cache import ResponseCache
from .errors import BackendTimeout, LmflowError, RecordNotWritten, RunStopping, StepFailure
from .home import subdir
from .leases import Lease
from .plugins import by_version
from .resilience import Resilience
from .spec import templates
from .spec.model import ModelConfig, ResponseCacheConfig, Spec, StepSpec
from .steps import get_kind

#: bump when the meaning of cached results changes (2: a step's result is a StepResult)
CACHE_VERSION = 2

Listener = Callable[[str, dict[str, Any]], None]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


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
        from .provenance import version_tags

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
        from .provenance import spec_version

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
                entry = {"event": event, **{k: v for k, v in data.items() if k != "spec"}}
                self.result.events.append(entry)
                self._append(entry)
            if self.listener:
                self.listener(event, data)

    def journal(self, entry: dict[str, Any]) -> None:
        """Append a fact about the run (a model it loaded) that a later run may need."""
        with self._lock:
            self._append(entry)

    def _append(self, entry: dict[str, Any]) -> None:
        if not self._journal.closed:
            try:
                self._journal.write(json.dumps(entry, default=str) + "\n")
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

    def update(self, step_id: str, **changes: Any) -> None:
        with self._lock:
            record = self.record(step_id)
            for key, value in changes.items():
                setattr(record, key, value)
            entry = {"step": step_id, "status": record.status}
            if record.status != "running":
                entry.update({k: v for k, v in asdict(record).items() if k not in ("id", "kind", "status")})
            self._append(entry)
            self.emit("step_started" if record.status == "running" else "step_finished", step=record)

    def item(self, step_id: str, index: int, status: str, *, output: Any = None,
             error: StepFailure | None = None, reason: str | None = None, seconds: float = 0.0,
             progress: dict[str, Any] | None = None) -> None:
        """One map item finished (completed, cached, failed or skipped): journaled at once."""
        with self._lock:
            entry: dict[str, Any] = {"step": step_id, "item": index, "status": status, "seconds": seconds}
            if status in ("completed", "cached"):
                entry["output"] = output
            if error is not None:
                entry["error"] = asdict(error)
            if reason:
                entry["reason"] = reason
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
                tmp.write_text(json.dumps(asdict(self.result), indent=2, default=str))
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


_CWD_LOCK = threading.Lock()
_CWD: dict[str, Any] = {"folder": None, "runs": 0, "before": None}


@contextmanager
def working_directory(folder: Path, warn: Callable[[str], None]) -> Iterator[None]:
    """Run in the spec's folder, the one rule for every relative path a spec or its code uses.

    `{file:}` values, datasets and models' paths are resolved against the spec's folder;
    user code (`python:` steps, loop bodies, fallbacks) opens files relative to the
    working directory, which is process-wide: the first run in a process moves there and
    the last one back. Runs of specs in other folders at the same time in one process
    cannot both have theirs; the later one says so and keeps the first's.
    """
    folder = folder.resolve()
    with _CWD_LOCK:
        if _CWD["runs"] == 0:
            _CWD.update(folder=folder, before=os.getcwd())
            os.chdir(folder)
        elif _CWD["folder"] != folder:
            warn(f"another run in this process works in {_CWD['folder']}: relative paths in this "
                 f"run's Python code resolve there, not in {folder}")
        _CWD["runs"] += 1
    try:
        yield
    finally:
        with _CWD_LOCK:
            _CWD["runs"] -= 1
            if _CWD["runs"] == 0:
                try:
                    os.chdir(_CWD["before"])
                except OSError:
                    pass  # the folder we came from is gone: stay where we are
                _CWD.update(folder=None, before=None)


def _declares_load(model: ModelConfig) -> bool:
    """Whether a model says how it must be loaded (so a server's own default load will not do)."""
    return bool(model.context_length or model.parallel or model.gpu is not None or model.ttl is not None
                or model.identifier)


def killed_journals(spec_name: str | None = None, *, marker: str | None = None,
                    warn: Callable[[str], None] | None = None) -> list[tuple[Path, list[dict[str, Any]]]]:
    """The journals (and their entries) of runs on this machine that were killed: no final record,
    their process gone. Of one spec's runs, or all; without an entry `marker` when one is given."""
    found = []
    pattern = f"{glob.escape(spec_name)}-*.jsonl" if spec_name else "*.jsonl"
    for journal in sorted(subdir("runs").glob(pattern)):
        if journal.with_suffix(".json").exists():
            continue
        entries = list(journal_entries(journal, warn))
        header = next((e for e in entries if "run" in e), {})
        if spec_name and header.get("name") != spec_name or _alive(header.get("pid")):
            continue
        if marker is None or not any(marker in e for e in entries):
            found.append((journal, entries))
    return found


def killed_runs_loads(spec: Spec, warn: Callable[[str], None] | None = None
                      ) -> list[tuple[Path, list[dict[str, Any]]]]:
    """Runs of this spec that were killed, with what each loaded and did not unload.

    See `killed_journals`; one already released by a later run is skipped. An entry with an
    `instance` was loaded; one with `loading` (and no instance) was being loaded when the run was
    killed. A line that is not what lmflow wrote is skipped with a warning (`warn`).
    """
    found = []
    for journal, entries in killed_journals(spec.name, marker="released_by", warn=warn):
        loads: dict[str, dict[str, Any]] = {}
        header: dict[str, Any] = {}
        for entry in entries:
            alias = entry.get("loaded", entry.get("loading", entry.get("unloaded")))
            if "run" in entry:
                header = entry
            elif not isinstance(alias, str) or not isinstance(entry.get("key", ""), str):
                continue  # not a load of lmflow's (a line edited by hand)
            elif "loading" in entry or "loaded" in entry:
                loads[alias] = entry
            else:
                loads.pop(alias, None)
        if header.get("spec") == str(spec.file):
            found.append((journal, list(loads.values())))
    return found


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return isinstance(pid, int)  # this process: a run still going (or a journal without a pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@by_version
def _options_validator(kind: str) -> Any:
    from jsonschema import Draft202012Validator

    from .spec.schema import spec_schema

    # a kind's schema may refer to the spec's definitions (a loop's checkpoints hold steps)
    return Draft202012Validator({**get_kind(kind).options_schema, "$defs": spec_schema()["$defs"]})


#: the step (or item, `step[3]`) the current thread runs: backend events and cache warnings name it
CURRENT_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmflow_step", default=None)


class Runtime:
    """Backends, models and outputs of one run; resolves what its units run with.

    Shared by every worker thread of a run: backends are created once under a lock,
    a model's effective settings (a probed context length) are resolved once, and the
    models the run loaded are tracked under the same lock. Outputs are written by the
    scheduler (one thread) before any dependent starts.
    """

    def __init__(self, spec: Spec, recorder: RunRecorder,
                 gates: dict[str, Callable[[], AbstractContextManager[Any]]] | None = None):
        self.spec = spec
        self.recorder = recorder
        self.backends: dict[str, Backend] = {}
        self.outputs: dict[str, Any] = {}
        self._steps: dict[str, dict[str, Any]] = {}  # the `steps` of templates: id -> {"output": ...}
        #: models this run loaded and has not unloaded, by alias
        self.loaded: dict[str, ModelConfig] = {}
        self._resolved: dict[str, ModelConfig] = {}
        #: models used as already loaded on the server exactly as declared (the run does not own them)
        self._in_use: set[str] = set()
        self._load_locks: dict[str, threading.Lock] = {}
        #: journal entries of loads that timed out (the instance may appear after the run gave up)
        self._timed_out_loads: list[dict[str, Any]] = []
        #: this run's use of a model on a server other lmflow runs may use too (lmflow.leases)
        self._leases: dict[tuple[str, str], Lease] = {}
        #: instances this run loaded, by alias, and those it handed over at its end
        self._instances: dict[str, str] = {}
        self._handed_over: dict[str, tuple[str, str]] = {}  # instance -> (alias, model key)
        self._lock = threading.RLock()
        #: set when the run ends or is interrupted: user code still running is no longer waited for
        self.stopping = threading.Event()
        #: per server name, a slot of the limit shared with other runs, held around each model call
        #: (given when the run talks to a Prefect server others may use)
        self.gates = gates or {}
        config = spec.response_cache or ResponseCacheConfig()
        cache = ResponseCache(config.directory, size_limit=config.size_limit,
                              warn=lambda message: recorder.emit("cache_error", step=CURRENT_STEP.get(),
                                                                 message=message))
        self.resilience = Resilience(spec.breaker, spec.guard, cache)

    # -- the Session a step sees --------------------------------------------

    @property
    def models(self) -> dict[str, ModelConfig]:
        return self.spec.models

    @property
    def response_cache(self) -> ResponseCacheConfig | None:
        return self.spec.response_cache

    # -- backends ---------------------------------------------------------

    def backend_for(self, alias: str) -> tuple[Backend, ModelConfig]:
        """The model's server and the resolved model (see `resolved`)."""
        return self.server_backend(self.spec.models[alias].server), self.resolved(alias)

    def resolved(self, alias: str) -> ModelConfig:
        """The model as this run uses it: a `probed` context length replaced by the size the
        probe registry holds (less its margin). The one place that resolves a model: loads,
        chats, step and response cache keys and unload tracking all use what it returns.
        Resolved once per run (the registry is read and the server fingerprinted once), and
        again after a probe_context step of the model (`model_probed`)."""
        with self._lock:
            model = self._resolved.get(alias)
        if model is not None:
            return model
        model = self.spec.models[alias]
        if isinstance(model.context_length, str):  # "probed": the registry's measured size
            from .probe import probed_size

            backend = self.server_backend(model.server)
            model = dataclasses.replace(model, context_length=probed_size(backend, model))
        with self._lock:
            return self._resolved.setdefault(alias, model)

    def model_probed(self, alias: str) -> None:
        """A probe of this model finished: every alias of its key on its server resolves again."""
        probed = self.spec.models[alias]
        with self._lock:
            for other, model in self.spec.models.items():
                if (model.key, model.server) == (probed.key, probed.server):
                    self._resolved.pop(other, None)

    def raw_model(self, alias: str) -> tuple[Backend, ModelConfig]:
        """The model as the spec declares it (a probe must not need its own result)."""
        model = self.spec.models[alias]
        return self.server_backend(model.server), model

    def server_backend(self, name: str) -> Backend:
        with self._lock:
            if name not in self.backends:
                config = self.spec.servers[name]
                self.recorder.emit("backend_starting", server=name, backend=config.backend,
                                   message=backend_class(config.backend).starting_message)
                backend = create_backend(config, self.spec.dir)
                backend.slots.gate = self.gates.get(name)
                backend.set_listener(
                    lambda event, data: self.recorder.emit(event, step=CURRENT_STEP.get(), **data))
                self.backends[name] = backend
            return self.backends[name]

    def ready(self, alias: str) -> tuple[Backend, ModelConfig]:
        """The model, loaded as the spec declares it before its first use.

        A model that declares a context length (or `probed`), parallel predictions or LM
        Studio load options is not left to the server's own just-in-time load (at the
        server's default size): the first chat of the run loads it here, once, or uses
        an instance already loaded exactly so. What this loads is unloaded at the end.
        """
        backend, model = self.backend_for(alias)
        if not backend.manages_models or not _declares_load(model):
            return backend, model
        with self._lock:
            if alias in self.loaded or alias in self._in_use:
                return backend, model
            lock = self._load_locks.setdefault(alias, threading.Lock())
        with lock:  # one load per model, while other models' chats go on
            with self._lock:
                if alias in self.loaded or alias in self._in_use:
                    return backend, model
            self._refuse_when_stopping(f"not loading '{model.key}'")
            self._lease(model)  # before looking: an instance another run is unloading is not found
            found = backend.find_loaded(model)
            if found is not None:
                with self._lock:
                    self._in_use.add(alias)
                return backend, model
            info = self.load(alias, model)
            self.recorder.emit("model_loaded", step=CURRENT_STEP.get(), alias=alias, key=model.key,
                               context_length=info.loaded_context_length)
            if model.context_length and info.loaded_context_length != model.context_length:
                self.recorder.emit("warning", step=CURRENT_STEP.get(), message=(
                    f"{backend.url or backend.kind} loaded '{model.key}' with context "
                    f"{info.loaded_context_length}, not the {model.context_length} that "
                    f"models.{alias}.context_length declares"))
        return backend, model

    def load(self, alias: str, model: ModelConfig) -> ModelInfo:
        """Load a model for this run, journaled before and after.

        The entry written before the load names the instances of the model already loaded,
        so the next run can tell which instance this one made if it is killed mid-load.
        """
        backend = self.server_backend(model.server)
        server = self.spec.servers.get(model.server)
        where = {"key": model.key, "server": model.server, "backend": server.backend if server else None,
                 "url": server.url if server else None}
        try:
            before: list[str] | None = [i for k, i in backend.loaded_instances() if k == model.key]
        except LmflowError:
            before = None  # a server that cannot list them: a kill mid-load is left to the user
        loading = {"loading": alias, **where, "context_length": model.context_length, "before": before}
        self._lease(model)
        self.recorder.journal(loading)
        try:
            info = backend.load(model)
        except BackendTimeout:
            with self._lock:  # the server may still finish it: unloaded at the end of the run
                self._timed_out_loads.append(loading)
            raise
        with self._lock:
            self.loaded[alias] = model
            self._instances[alias] = info.instance_id
            self._in_use.discard(alias)
            # journaled: the next run of this spec unloads it if this one is killed
            self.recorder.journal({"loaded": alias, **where, "instance": info.instance_id})
        if self.stopping.is_set():  # the run ended while it loaded: `close` may have run already
            self._unload_owned(alias)
            self._refuse_when_stopping(f"unloaded '{model.key}' again")
        return info

    def _refuse_when_stopping(self, what: str) -> None:
        if self.stopping.is_set():
            raise RunStopping(f"the run is stopping: {what}")

    def _lease(self, model: ModelConfig) -> Lease | None:
        """This run's lease on the model's key on its server (None for a server lmflow owns)."""
        server = self.spec.servers.get(model.server)
        if server is None or not server.url or backend_class(server.backend).owns_server:
            return None
        name = (model.server, model.key)
        with self._lock:
            lease = self._leases.get(name)
        if lease is None:
            lease = Lease(server.url, model.key)  # outside the lock: it waits while another run unloads
            with self._lock:
                kept = self._leases.setdefault(name, lease)
            if kept is not lease:
                lease.close()
            lease = kept
        return lease

    def _unload_owned(self, alias: str) -> None:
        """Unload a model this run loaded (unless kept loaded); a failure is a warning. Where
        another lmflow run may use it too, it is handed over to its lease instead (see `close`)."""
        with self._lock:
            model = self.loaded.pop(alias, None)
            backend = self.backends.get(model.server) if model is not None else None
            instance = self._instances.pop(alias, None)
            if model is None or backend is None:
                return
            if model.keep_loaded:
                return
            lease = self._leases.get((model.server, model.key))
            if lease is not None and lease.held and instance is not None:
                lease.hand_over(instance, self.recorder.result.run_id)
                self._handed_over[instance] = (alias, model.key)
                return
            try:
                backend.unload(model)
            except LmflowError as exc:
                self.recorder.emit("warning", message=f"could not unload {model.key}: {exc}")
                return
            self.recorder.journal({"unloaded": alias})

    def model_unloaded(self, alias: str) -> None:
        with self._lock:
            if self.loaded.pop(alias, None) is not None:
                self.recorder.journal({"unloaded": alias})
            self._in_use.discard(alias)

    def release_leftovers(self) -> None:
        """Unload what an earlier run of this spec loaded and could not unload (it was killed), and
        stop (or forget the PID files of) children of any lmflow process that died without it."""
        processes.reap_orphans()
        for journal, leftovers in killed_runs_loads(
                self.spec, lambda message: self.recorder.emit("warning", message=message)):
            for entry in leftovers:
                name = entry.get("server")
                if name not in self.spec.servers or entry.get("backend") != self.spec.servers[name].backend \
                        or backend_class(entry["backend"]).owns_server:
                    continue  # a server lmflow ran died with its owner, and what it had loaded
                hint = f"`lmflow models unload {entry['key']} --server URL` unloads it by hand"
                try:
                    backend = self.server_backend(name)
                    instance = entry.get("instance") or self._made_by_unfinished_load(backend, entry)
                    if instance is None:
                        continue
                    if isinstance(instance, list):
                        self.recorder.emit("warning", message=(
                            f"the killed run {journal.stem} was loading '{entry['key']}'; the server now "
                            f"has {len(instance)} new instances of it ({', '.join(instance)}) and lmflow "
                            f"cannot tell which is that run's; {hint}"))
                        continue
                    done = backend.unload_instance(instance)
                except LmflowError as exc:
                    self.recorder.emit("warning", message=(
                        f"could not unload '{entry['key']}' left loaded by the killed run "
                        f"{journal.stem}: {exc}; {hint}"))
                    continue
                if done:
                    self.recorder.emit("warning", message=(
                        f"unloaded '{entry['key']}' (instance {instance}), left loaded by the "
                        f"killed run {journal.stem}"))
            # handled: the next run looks no more
            jsonl.append(journal, {"released_by": self.recorder.result.run_id})

    @staticmethod
    def _made_by_unfinished_load(backend: Backend, entry: dict[str, Any]) -> str | list[str] | None:
        """The instance a run killed mid-load made: of the model's instances now loaded at the size
        it asked for, the one not there before its load (a list when that is not one instance)."""
        if entry.get("before") is None:
            return None
        new = [i for k, i in backend.loaded_instances() if k == entry["key"] and i not in entry["before"]]
        if len(new) > 1 and entry.get("context_length"):  # others loaded since: the size it asked for
            sized = [i for i in new if backend.loaded_config(i).get(  # type: ignore[attr-defined]
                "context_length") == entry["context_length"]]
            new = sized or new
        return new[0] if len(new) == 1 else (new or None)

    def close(self) -> None:
        """Unload what this run loaded (unless kept) and stop its engines, also after a failure."""
        self.stopping.set()  # a unit still in flight loads nothing from now on (see `ready`)
        with self._lock:
            for alias in list(self.loaded):
                self._unload_owned(alias)
            self._release_leases()
            for entry in self._timed_out_loads:
                backend = self.backends.get(entry["server"])
                try:
                    instance = self._made_by_unfinished_load(backend, entry) if backend else None
                    if isinstance(instance, str) and backend.unload_instance(instance):  # type: ignore[union-attr]
                        self.recorder.emit("warning", message=(
                            f"unloaded '{entry['key']}' (instance {instance}): its load timed out, "
                            "and the server finished it later"))
                except LmflowError as exc:
                    self.recorder.emit("warning", message=f"could not unload {entry['key']}: {exc}")
            while self.backends:
                _, backend = self.backends.popitem()
                backend.close()
        cache = self.resilience.cache
        if cache is not None:
            self.recorder.result.stats.update(response_cache=cache.stats.summary(),
                                              fallback_answers=self.resilience.fallbacks)
        self.resilience.close()

    def _release_leases(self) -> None:
        """End this run's use of shared models: the last run to use one unloads what runs loaded."""
        for (server, key), lease in self._leases.items():
            backend = self.backends.get(server)

            def unload(note: dict[str, Any], backend: Backend | None = backend) -> None:
                alias = self._handed_over.pop(note["instance"], (None, None))[0]
                try:
                    done = backend is not None and backend.unload_instance(note["instance"])
                except LmflowError as exc:
                    self.recorder.emit("warning", message=f"could not unload {note['key']}: {exc}")
                    return
                if alias is not None:
                    self.recorder.journal({"unloaded": alias})
                elif done:  # (a killed run's instance may be gone already: released, or unloaded by hand)
                    self.recorder.emit("warning", message=(
                        f"unloaded '{note['key']}' (instance {note['instance']}), which the run "
                        f"{note.get('loaded_by')} loaded and left to the last run using it"))

            if not lease.release(unload):
                for instance, (alias, handed_key) in list(self._handed_over.items()):
                    if handed_key == key:
                        del self._handed_over[instance]
                        self.recorder.journal({"handed_over": alias, "instance": instance})
                        self.recorder.emit("warning", message=(
                            f"left '{key}' loaded (instance {instance}): another lmflow run on this "
                            "machine uses it, and the last of them to end unloads it"))
        self._leases.clear()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- values -----------------------------------------------------------

    def set_output(self, step_id: str, output: Any) -> None:
        """A finished step's output, visible to the steps that depend on it."""
        self.outputs[step_id] = output
        self._steps[step_id] = {"output": output}

    def names(self, step: StepSpec, item: Any = None, index: int | None = None) -> dict[str, Any]:
        """What templates and conditions of `step` (or one of its items) can refer to."""
        names = {"params": self.spec.params, "steps": self._steps}
        if step.foreach is not None and index is not None:
            names.update(item=item, index=index)
        return names

    def nested_names(self, extra: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        """What steps nested in a kind (a loop's checkpoints) refer to: params, the outputs of the
        top-level steps and of the nested steps that ran before, and the kind's own (`loop`)."""
        steps = {**self._steps, **{k: {"output": v} for k, v in outputs.items()}} if outputs else self._steps
        return {"params": self.spec.params, "steps": steps, **extra}

    def items(self, step: StepSpec) -> list[Any]:
        """The items of a map step (its foreach resolved)."""
        from .datasets import items

        foreach = step.foreach
        assert foreach is not None
        value = templates.render(foreach.value, self.names(step)) if foreach.source == "value" else None
        return items(foreach, self.spec.dir, value)

    def item_condition(self, step: StepSpec) -> bool:
        """True when `when` refers to the item, so it is decided per item, not for the step."""
        return step.foreach is not None and step.when is not None and not isinstance(step.when, bool) \
            and any(ref.root in ("item", "index") for ref in step.when.references)

    def resolve(self, step: StepSpec, item: Any = None, index: int | None = None,
                names: dict[str, Any] | None = None) -> dict[str, Any]:
        """The step's options with every reference replaced, checked against the kind's schema."""
        options = templates.render(step.options, names or self.names(step, item, index))
        error = next(iter(_options_validator(step.kind).iter_errors(options)), None)
        if error is not None:
            where = ".".join([step.kind, *map(str, error.absolute_path)])
            raise templates.TemplateError(
                f"{where}: {error.message} (after resolving references; fix the referenced "
                "value or the step)")
        return options

    def cache_key(self, step: StepSpec, resolved: dict[str, Any]) -> str:
        """Hash of everything that changes the step's answer, never of a timestamp.

        A map item's key is its step's key with the item's resolved options: the same
        item gives the same key in the next run, wherever it stands in the list.
        """
        kind = get_kind(step.kind)
        models = {alias: self.model_identity(alias) for alias in kind.models(resolved)}
        material = {
            "v": CACHE_VERSION, "step": step.id, "kind": step.kind, "options": resolved,
            "models": models, "extra": kind.cache_material(resolved, self.spec.dir),
        }
        material.update(kind.nested_material(step, self) or {})  # steps of its own (a loop's checkpoints)
        digest = hashlib.sha256(canonical_json(material).encode()).hexdigest()
        return f"lmflow-{step.id}-{digest[:40]}"

    def model_identity(self, alias: str) -> dict[str, Any]:
        """What about a model changes its answers (step and response cache keys): the resolved
        model (a probed size as a number, so a new probe is a new key), its server, and the code
        of its python fallbacks."""
        from .steps.python import source_hash

        model = self.resolved(alias)
        server = self.spec.servers[model.server]
        # the port of a server lmflow runs itself changes every run; what it serves does not
        url = None if backend_class(server.backend).owns_server else server.url
        identity = {**model.identity(), "backend": server.backend, "url": url}
        if model.fallback:  # (only then: keys of models without one stay as they were)
            identity["fallback"] = [[link.kind, link.target, source_hash(link.target, self.spec.dir)
                                     if link.kind == "python" else None] for link in model.fallback]
        return identity
