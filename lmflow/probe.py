"""Measure the context a model really loads at (the loadable maximum).

Every attempt unloads, loads at size N and reads back the context the server
applied: a clamped load is its own outcome, not a pass. Attempts are written
to a journal before they start and after they end, so a killed probe resumes
where it stopped; the model is never left loaded. Results live in a registry
under lmflow's home, keyed by everything that changes the answer.

(The working maximum, filling the context for real, comes with the rest of
the context-probe work.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .backends.base import Backend
from .errors import BackendError, BackendTimeout
from .home import subdir
from .spec.model import ModelConfig

OK, CLAMPED, LOAD_FAILED, TIMEOUT = "ok", "clamped", "load_failed", "timeout"


@dataclass
class Attempt:
    size: int
    outcome: str
    actual: int | None = None
    seconds: float = 0.0
    detail: str = ""


@dataclass
class ProbeReport:
    key: dict[str, Any]
    declared_max: int | None
    granularity: int
    loadable_max: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    finished: bool = False

    @property
    def loads(self) -> int:
        return len(self.attempts)


def registry_key(backend: Backend, model: ModelConfig) -> dict[str, Any]:
    """Everything that changes the answer: server, backend, model key and its load options."""
    return {"server": backend.url or "local", "backend": backend.kind, "model": model.key,
            "path": model.path, "gpu": model.gpu, "options": model.options}


def record_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return subdir("probes") / f"{digest}.jsonl"


def _replay(path: Path) -> dict[int, Attempt]:
    """Attempts that finished in an earlier (maybe killed) run of the same probe."""
    done: dict[int, Attempt] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # torn by a kill
            if "outcome" in entry:
                done[entry["size"]] = Attempt(**{k: entry[k] for k in Attempt.__dataclass_fields__})
    return done


def _append(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a") as out:
        out.write(json.dumps(entry, default=str) + "\n")


def probe_loadable(backend: Backend, model: ModelConfig, *, minimum: int = 1024,
                   maximum: int | None = None, granularity: int = 1024,
                   on_attempt: Callable[[Attempt], None] = lambda a: None,
                   fresh: bool = False) -> ProbeReport:
    """Largest context (a multiple of `granularity`) the model loads at without clamping.

    Grows geometrically from `minimum`, then bisects between the last size that
    loaded and the first that did not.
    """
    declared = maximum
    if declared is None:
        declared = next((m.max_context_length for m in backend.list_models() if m.key == model.key), None)
    if declared is None:
        raise BackendError(f"{backend.url}: no declared maximum context for '{model.key}': "
                           "give --max", url=backend.url)
    key = registry_key(backend, model)
    path = record_path(key)
    report = ProbeReport(key=key, declared_max=declared, granularity=granularity)
    if fresh:
        path.unlink(missing_ok=True)
    done = _replay(path)
    if not path.exists():
        _append(path, {"probe": key, "declared_max": declared, "granularity": granularity})

    def attempt(size: int) -> bool:
        if size in done:
            result = done[size]
        else:
            _append(path, {"start": size})
            result = _load_once(backend, model, size)
            _append(path, asdict(result))
            done[size] = result
        report.attempts.append(result)
        on_attempt(result)
        return result.outcome == OK

    low = max(granularity, minimum - minimum % granularity)
    high = declared - declared % granularity
    best: int | None = None
    failed: int | None = None
    size = low
    while True:  # grow geometrically
        if attempt(size):
            best = size
            if size >= high:
                break
            size = min(size * 2, high)
        else:
            failed = size
            break
    if best is not None and failed is not None:
        while failed - best > granularity:  # bisect on multiples of the granularity
            middle = (best + failed) // 2
            middle -= middle % granularity
            if middle <= best:
                middle = best + granularity
            if attempt(middle):
                best = middle
            else:
                failed = middle
    report.loadable_max = best
    report.finished = True
    _append(path, {"loadable_max": best, "finished": True})
    return report


def _load_once(backend: Backend, model: ModelConfig, size: int) -> Attempt:
    sized = dataclasses.replace(model, context_length=size)
    started = time.monotonic()
    try:
        backend.unload(sized)  # every attempt starts from nothing loaded
        info = backend.load(sized)
    except BackendTimeout as exc:
        return Attempt(size, TIMEOUT, seconds=round(time.monotonic() - started, 3), detail=str(exc))
    except BackendError as exc:
        return Attempt(size, LOAD_FAILED, seconds=round(time.monotonic() - started, 3), detail=str(exc))
    finally_seconds = round(time.monotonic() - started, 3)
    try:
        backend.unload(sized)
    except BackendError:
        pass  # reported by the next attempt's unload if it matters
    actual = info.loaded_context_length
    outcome = OK if actual == size else CLAMPED
    detail = "" if outcome == OK else f"asked {size}, the server applied {actual}"
    return Attempt(size, outcome, actual, finally_seconds, detail)


def registry() -> list[dict[str, Any]]:
    """Every finished probe: its key and loadable maximum."""
    results = []
    for path in sorted(subdir("probes").glob("*.jsonl")):
        key, best, finished = None, None, False
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            key = entry.get("probe", key)
            if entry.get("finished"):
                best, finished = entry.get("loadable_max"), True
        if key and finished:
            results.append({**key, "loadable_max": best})
    return results
