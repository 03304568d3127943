"""Recovery after a killed run: the journals it left, the models it left loaded, its answers.

A run killed before its end (or stopped by a full disk) leaves a journal (`runs/<run_id>.jsonl`)
without a final record. The next run of its spec finds it (`killed_journals`), unloads what it
loaded (`release_leftovers`, also the instance a load made when the run was killed during it),
and marks the journal so that no later run looks again; lmflow.prefect.history marks its flow
run Crashed in Prefect. The answers it journaled under their cache keys answer for the step
cache where that lost them (`JournaledAnswers`): a full disk leaves result files 0 bytes or
unwritten while the journal still takes lines.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import jsonl, processes
from ..backends import Backend, backend_class
from ..errors import LmflowError
from ..home import subdir
from ..spec.model import Spec
from ..steps import StepResult
from .records import RunRecorder, journal_entries


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


def release_leftovers(spec: Spec, recorder: RunRecorder, server_backend: Callable[[str], Backend]) -> None:
    """Unload what an earlier run of this spec loaded and could not unload (it was killed), and
    stop (or forget the PID files of) children of any lmflow process that died without it.

    `server_backend` is the run's own (`Runtime.server_backend`): a server it starts is closed
    with the run."""
    processes.reap_orphans()
    for journal, leftovers in killed_runs_loads(
            spec, lambda message: recorder.emit("warning", message=message)):
        for entry in leftovers:
            name = entry.get("server")
            if name not in spec.servers or entry.get("backend") != spec.servers[name].backend \
                    or backend_class(entry["backend"]).owns_server:
                continue  # a server lmflow ran died with its owner, and what it had loaded
            hint = f"`lmflow models unload {entry['key']} --server URL` unloads it by hand"
            try:
                backend = server_backend(name)
                instance = entry.get("instance") or made_by_unfinished_load(backend, entry)
                if instance is None:
                    continue
                if isinstance(instance, list):
                    recorder.emit("warning", message=(
                        f"the killed run {journal.stem} was loading '{entry['key']}'; the server now "
                        f"has {len(instance)} new instances of it ({', '.join(instance)}) and lmflow "
                        f"cannot tell which is that run's; {hint}"))
                    continue
                done = backend.unload_instance(instance)
            except LmflowError as exc:
                recorder.emit("warning", message=(
                    f"could not unload '{entry['key']}' left loaded by the killed run "
                    f"{journal.stem}: {exc}; {hint}"))
                continue
            if done:
                recorder.emit("warning", message=(
                    f"unloaded '{entry['key']}' (instance {instance}), left loaded by the "
                    f"killed run {journal.stem}"))
        # handled: the next run looks no more
        jsonl.append(journal, {"released_by": recorder.result.run_id})


def made_by_unfinished_load(backend: Backend, entry: dict[str, Any]) -> str | list[str] | None:
    """The instance a run killed mid-load made: of the model's instances now loaded at the size
    it asked for, the one not there before its load (a list when that is not one instance). Also
    for a load of this run that timed out (`Runtime.close`)."""
    if entry.get("before") is None:
        return None
    new = [i for k, i in backend.loaded_instances() if k == entry["key"] and i not in entry["before"]]
    if len(new) > 1 and entry.get("context_length"):  # others loaded since: the size it asked for
        sized = [i for i in new if backend.loaded_config(i).get(  # type: ignore[attr-defined]
            "context_length") == entry["context_length"]]
        new = sized or new
    return new[0] if len(new) == 1 else (new or None)


class JournaledAnswers:
    """Answers that runs of a spec which did not end (killed, or stopped by a write that failed: no
    final record) journaled under their cache keys: what answers when the step cache has lost one.

    A completed unit's journal line holds its key only when its answer may be reused (cacheable,
    not from a fallback link, JSON that reads back as it was) and, with a time to live, when it
    expires (`Lifecycle.reusable`). The journals are read once, when a unit first asks; only
    where each answer's line starts is kept (a big map's answers stay on disk), the latest run's
    for a key. Thread-safe: a chunk's items ask from many threads.
    """

    def __init__(self, spec_name: str):
        self.spec_name = spec_name
        self._where: dict[str, tuple[Path, int]] | None = None
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[StepResult, float | None] | None:
        """The answer journaled under `key` and the seconds it has left to live (None: no limit);
        None when none was, or it expired."""
        where = self._where if self._where is not None else self._read()
        found = where.get(key)
        if found is None:
            return None
        entry = jsonl.line_at(*found)
        if entry is None or entry.get("key") != key or not _answer(entry):
            return None
        left = None
        if entry.get("expires") is not None:
            left = entry["expires"] - time.time()
            if left <= 0:
                return None
        return StepResult(entry["output"], meta=entry.get("meta") or {}, answered_by=entry.get("answered_by"),
                          errors=entry.get("errors") or []), left

    def _read(self) -> dict[str, tuple[Path, int]]:
        with self._lock:
            if self._where is None:
                where: dict[str, tuple[Path, int]] = {}
                # (their bad lines were warned of at the run's start: release_leftovers reads them)
                for journal, _ in killed_journals(self.spec_name, warn=lambda _: None):  # oldest first
                    for offset, entry in jsonl.starts(journal, b'"key": '):
                        if isinstance(entry.get("key"), str) and _answer(entry):
                            where[entry["key"]] = (journal, offset)
                self._where = where
            return self._where


def _answer(entry: dict[str, Any]) -> bool:
    """Whether a journal line is a completed unit's answer, with fields of the types lmflow writes."""
    return (entry.get("status") in ("completed", "cached") and "output" in entry
            and isinstance(entry.get("expires", 0), (int, float))
            and isinstance(entry.get("meta", {}), dict) and isinstance(entry.get("errors", []), list)
            and isinstance(entry.get("answered_by"), (dict, type(None))))
