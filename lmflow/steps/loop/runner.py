"""Running a `loop` step: the user's generations, checkpoints that ask a coach, resume after a kill.

One thread drives the loop: it calls the body once per generation, and between two
generations it applies advice, saves the state and starts checkpoints. Only that
thread touches the user's state. A checkpoint in `background` mode runs its steps in a
thread of its own, on a snapshot of what it may see (`loop.*` is copied when it is
asked); its advice comes back to the loop thread, which applies it at the next
generation boundary. So the state needs no lock, and advice is applied exactly once.

Resume: after every generation, and after every applied advice, the state is pickled
to `$LMFLOW_HOME/loops/<key>.state` (written to a temporary file, then renamed: a kill
leaves the old file or the new one, never half of one); each generation's stats are
appended to `<key>.stats.jsonl`. The key is the loop step's cache key, so re-running
the same spec with the same params resumes where the killed run stopped. A finished
loop removes both files; `lmflow run --refresh` starts afresh.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

from ... import jsonl
from ...errors import (
    LmflowError,
    LoopStopped,  # noqa: F401 - raised here, defined with the tree
)
from ...spec.model import StepSpec, parse_duration
from ..base import StepContext, StepResult
from ..python import UserCodeError, call, load_function
from .apply import apply_fields
from .report import analysis_line
from .spec import Checkpoint

#: bump when the state file's layout changes (an old file is then not resumed)
STATE_VERSION = 1
#: seconds between two updates of the loop's report in Prefect's UI (and at every advice)
PUBLISH_EVERY = 30.0


def state_view(state: Any) -> dict[str, Any]:
    """What templates, `until` and the output see of the state: its fields not starting with `_`."""
    fields = state if isinstance(state, dict) else getattr(state, "__dict__", {})
    return {k: v for k, v in fields.items() if not str(k).startswith("_")}


def _snapshot(value: Any) -> Any:
    """A JSON-safe deep copy (what a background analysis sees must not change under it)."""
    return json.loads(json.dumps(value, default=str))


class LoopRunner:
    """Runs one loop step to its end (or its stop), resuming from a saved state when there is one."""

    def __init__(self, step: StepSpec, options: dict[str, Any], ctx: StepContext):
        from ...home import subdir

        assert step.nested is not None and ctx.units is not None
        self.step, self.ctx, self.units = step, ctx, ctx.units
        self.checkpoints = step.nested.checkpoints
        self.until = step.nested.until
        self.body_ref: str = options["body"]
        init = options["init"]
        self.init_ref, self.init_args = (init, {}) if isinstance(init, str) else (
            init["function"], init.get("args") or {})
        self.total = _count(options.get("generations"))
        self.max_seconds = parse_duration(options["max_seconds"]) if "max_seconds" in options else None
        self.chart = options.get("chart")
        self.window = max([options.get("history") or 5] + [c.history for c in self.checkpoints])
        key = self.units.key(step, options)
        folder = subdir("loops")
        self.state_path = folder / f"{key}.state"
        self.stats_path = folder / f"{key}.stats.jsonl"
        # what the loop thread owns
        self.state: Any = None
        self.generation = 0
        self.history: list[dict[str, Any]] = []
        self.analyses: list[dict[str, Any]] = []
        self.previous: dict[int, dict[str, Any]] = {}  # checkpoint -> its last analysis' outputs
        self.done_at: dict[int, int] = {}  # checkpoint -> the last generation it was asked at
        #: background analyses in flight: checkpoint -> (its record, its future)
        self.pending: dict[int, tuple[dict[str, Any], concurrent.futures.Future]] = {}
        #: after a resume: checkpoint -> the generation an analysis in flight at the kill was asked at
        self.reask: dict[int, int] = {}
        self.elapsed_before = 0.0
        self.resumed_from: int | None = None
        self.stopped = ""
        self.published = 0.0
        self.started = time.perf_counter()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # -- the loop ---------------------------------------------------------

    def run(self) -> StepResult:
        spec_dir, policy, cancel = self.ctx.spec_dir, self.ctx.policy, self.ctx.stopping
        body = load_function(self.body_ref, spec_dir)
        if self.units.refresh or not self._resume():
            self._start_fresh()
        self.started = time.perf_counter()
        stats_file = open(self.stats_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        try:
            self._checkpoints_due(self.generation, resuming=self.resumed_from is not None)
            while not self._should_stop():
                g = self.generation + 1
                stats = call(self.body_ref, lambda g=g: body(self.state, g), {}, policy.timeout, cancel)
                stats = _stats(stats, self.body_ref)
                stats_file.write(json.dumps({"g": g, "stats": stats}) + "\n")
                stats_file.flush()
                self.generation = g
                self.history.append({"generation": g, **stats})
                if self.until is not None and self._until(stats):
                    self.stopped = "until"
                    self._save()
                    break
                self._harvest(g)
                self._save()
                self._checkpoints_due(g)
                self._progress(stats)
        except BaseException:
            if self._pool is not None:  # the state is saved up to the last generation: a re-run resumes
                self._pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            stats_file.close()
        self._finish_background()
        self._publish(final=True)
        self._save()  # late analyses are recorded too (a re-run of a finished loop is its cache's job)
        output = self._output()
        self._remove_files()
        return StepResult(output, meta={"generations": self.generation, "stopped": self.stopped,
                                        "analyses": len(self.analyses)})

    def _should_stop(self) -> bool:
        if self.ctx.stopping is not None and self.ctx.stopping.is_set():
            self._save()
            raise LoopStopped(f"the run was stopped at generation {self.generation}; its state is saved: "
                              "run the spec again to resume")
        if self.total is not None and self.generation >= self.total:
            self.stopped = self.stopped or "generations"
            return True
        if self.max_seconds is not None and self.elapsed() >= self.max_seconds:
            self.stopped = "max_seconds"
            return True
        return bool(self.stopped)

    def _until(self, stats: dict[str, Any]) -> bool:
        from ...spec.expressions import ExpressionError

        try:
            return self.until.test(self._names(stats))
        except ExpressionError as exc:
            fields = ", ".join(stats) or "none"
            raise LmflowError(f"until: {exc.message} at generation {self.generation} (loop.stats has: "
                              f"{fields}; loop.state has: {', '.join(state_view(self.state)) or 'none'})") \
                from None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _names(self, stats: dict[str, Any] | None = None, history: int | None = None,
               checkpoint: Checkpoint | None = None) -> dict[str, Any]:
        loop = {"generation": self.generation, "generations": self.total, "state": state_view(self.state),
                "stats": stats if stats is not None else (self.history[-1] if self.history else None),
                "history": self.history[-(history or self.window):],
                "previous": self.previous.get(checkpoint.index) if checkpoint else None,
                "asked_at": self.generation}
        return self.units.names({"loop": loop})

    # -- checkpoints ------------------------------------------------------

    def _checkpoints_due(self, g: int, resuming: bool = False) -> None:
        """Ask the checkpoints due at generation g; after a resume, first those the kill interrupted."""
        for checkpoint in self.checkpoints:
            index = checkpoint.index
            if resuming and index in self.reask:  # in flight at the kill: asked again, applied once
                del self.reask[index]
                self._ask_now(checkpoint, g, reasked=True)
            elif g > 0 and checkpoint.due(g) and self.done_at.get(index) != g:
                self._ask_now(checkpoint, g, reasked=resuming)

    def _ask_now(self, checkpoint: Checkpoint, g: int, reasked: bool) -> None:
        # marked before anything is saved: a state on disk with this analysis applied says so too
        self.done_at[checkpoint.index] = g
        if checkpoint.mode == "background":
            return self._ask_in_background(checkpoint, g, reasked)
        analysis = self._new_analysis(checkpoint, g, reasked)
        self._conclude(checkpoint, analysis, self._ask(checkpoint, analysis["_names"], g), g)
        self._save()

    def _new_analysis(self, checkpoint: Checkpoint, g: int, reasked: bool = False) -> dict[str, Any]:
        names = _snapshot(self._names(history=checkpoint.history, checkpoint=checkpoint)["loop"])
        analysis = {"checkpoint": checkpoint.index, "mode": checkpoint.mode, "asked_at": g,
                    "applied_at": None,
                    "status": "asked", "steps": {}, "advice": None, "changes": [], "seconds": None,
                    "error": None, "_names": names, "_started": time.perf_counter()}
        if reasked:
            analysis["reasked"] = True
        return analysis

    def _ask_in_background(self, checkpoint: Checkpoint, g: int, reasked: bool = False) -> None:
        busy = self.pending.get(checkpoint.index)
        if busy is not None:  # a slow coach: the next analysis waits for the one in flight
            analysis = self._new_analysis(checkpoint, g)
            analysis.pop("_names")
            analysis.pop("_started")
            analysis.update(status="skipped", error=f"the analysis asked at generation "
                                                    f"{busy[0]['asked_at']} is still running")
            return self._record(analysis)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(len(self.checkpoints), 1), thread_name_prefix=f"lmflow-{self.step.id}")
        analysis = self._new_analysis(checkpoint, g, reasked)
        context = contextvars.copy_context()  # the task run and the runtime go along
        future = self._pool.submit(context.run, self._ask, checkpoint, analysis["_names"], g)
        self.pending[checkpoint.index] = (analysis, future)
        self._save()

    def _harvest(self, g: int) -> None:
        """Apply the background advice that has arrived (at this generation boundary)."""
        for index, (analysis, future) in list(self.pending.items()):
            if future.done():
                del self.pending[index]
                self._conclude(self.checkpoints[index], analysis, future.result(), g)

    def _finish_background(self) -> None:
        """Analyses still running when the loop ends: wait for them and record them, not applied."""
        for index, (analysis, future) in list(self.pending.items()):
            del self.pending[index]
            self._conclude(self.checkpoints[index], analysis, future.result(), None)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _ask(self, checkpoint: Checkpoint, loop: dict[str, Any], g: int) -> dict[str, Any]:
        """Run the checkpoint's steps in order, each a unit like any other (lmflow.engine.unit); never
        raises (a failure is part of the answer)."""
        outputs: dict[str, Any] = {}
        steps: dict[str, Any] = {}
        for step in checkpoint.steps:
            outcome = self.units.run(step, self.units.names({"loop": loop}, outputs),
                                     f"{self.step.id}@{g}.{step.id}")
            steps[step.id] = outcome.summary()
            if outcome.failure is not None:  # recorded; the loop goes on
                return {"outputs": outputs, "steps": steps, "error": f"{step.id}: {outcome.failure.message}"}
            outputs[step.id] = outcome.output
        return {"outputs": outputs, "steps": steps, "error": None}

    def _conclude(self, checkpoint: Checkpoint, analysis: dict[str, Any], answer: dict[str, Any],
                  applied_at: int | None) -> None:
        """Record an analysis and apply its advice (applied_at None: it came after the last generation)."""
        analysis.pop("_names", None)
        analysis["seconds"] = _since(analysis.pop("_started"))
        analysis["steps"] = answer["steps"]
        self.previous[checkpoint.index] = answer["outputs"]
        if answer["error"] is not None:
            analysis.update(status="failed", error=answer["error"])
            return self._record(analysis)
        advice = answer["outputs"].get(checkpoint.steps[-1].id) if checkpoint.steps else None
        analysis["advice"] = advice
        if applied_at is None:
            analysis["status"] = "late"
            analysis["error"] = "the loop had ended when the advice came: not applied"
        elif checkpoint.apply is None:
            analysis["status"] = "recorded"
        elif advice is None:
            analysis["status"] = "no advice"
        else:
            self._apply(checkpoint, analysis, advice, applied_at)
        self._record(analysis)
        if analysis["applied_at"] is not None:
            self._save()

    def _apply(self, checkpoint: Checkpoint, analysis: dict[str, Any], advice: Any, g: int) -> None:
        if isinstance(checkpoint.apply, str):
            ref = checkpoint.apply
            try:
                function = load_function(ref, self.ctx.spec_dir)
                state = self.state
                new = call(ref, lambda: function(state, advice), {}, self.ctx.policy.timeout,
                           self.ctx.stopping)
            except UserCodeError as exc:
                analysis.update(status="apply failed", error=str(exc))
                return
            if new is not None:
                self.state = new
            analysis.update(status="applied", applied_at=g, changes=[{"function": ref}])
            return
        assert checkpoint.apply is not None
        changes = apply_fields(self.state, advice, checkpoint.apply)
        analysis["changes"] = changes
        if any(c["status"] in ("applied", "clamped", "normalised", "unchanged") for c in changes):
            analysis.update(status="applied", applied_at=g)
        else:
            rejected = any(c["status"] == "rejected" for c in changes)
            analysis["status"] = "rejected" if rejected else "no advice"

    def _record(self, analysis: dict[str, Any]) -> None:
        self.analyses.append(analysis)
        self.ctx.emit("analysis", {"analysis": analysis, "line": analysis_line(self.ctx.step_id, analysis)})
        self._publish(final=False, force=True)

    # -- state on disk ------------------------------------------------------

    def _start_fresh(self) -> None:
        self._remove_files()
        init = load_function(self.init_ref, self.ctx.spec_dir)
        self.state = call(self.init_ref, lambda: init(**self.init_args), {}, self.ctx.policy.timeout,
                          self.ctx.stopping)
        if self.state is None:
            raise UserCodeError(f"{self.init_ref} returned None: it must return the loop's first state")

    def _resume(self) -> bool:
        try:
            saved = pickle.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001 - a state that cannot be read is not resumed
            self.ctx.emit("warning", {"message": f"cannot resume from {self.state_path.name}: {exc}; "
                                                 "starting afresh"})
            return False
        if saved.get("version") != STATE_VERSION:
            return False
        self.state, self.generation = saved["state"], saved["generation"]
        self.analyses, self.previous, self.done_at = saved["analyses"], saved["previous"], saved["done_at"]
        self.elapsed_before = saved["elapsed"]
        self.stopped = saved.get("stopped", "")
        self.history = _read_stats(self.stats_path, self.generation)
        self.reask = dict(saved["pending"])  # analyses in flight at the kill are asked again right away
        self.resumed_from = self.generation
        self.ctx.emit("warning", {"message": f"resuming from generation {self.generation} "
                                             f"(saved by an earlier run)"})
        return True

    def _save(self) -> None:
        data = {"version": STATE_VERSION, "generation": self.generation, "state": self.state,
                "analyses": self.analyses, "previous": self.previous, "done_at": self.done_at,
                "pending": {i: a["asked_at"] for i, (a, _f) in self.pending.items()},
                "elapsed": self.elapsed(),
                "stopped": self.stopped}
        try:
            blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - whatever the user's state holds
            raise LmflowError(f"the loop's state cannot be saved ({type(exc).__name__}: {exc}): it is "
                              "pickled after every generation so a killed run can resume; keep functions, "
                              "open files and locks out of the state") from None
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, self.state_path)

    def _remove_files(self) -> None:
        for path in (self.state_path, self.stats_path):
            path.unlink(missing_ok=True)

    # -- what the user sees -------------------------------------------------

    def _output(self) -> dict[str, Any]:
        return {"generations": self.generation, "stopped": self.stopped,
                "state": _snapshot(state_view(self.state)),
                "stats": self.history[-1] if self.history else None, "history": self.history,
                "analyses": sorted(self.analyses, key=lambda a: (a["asked_at"], a["checkpoint"])),
                "resumed_from": self.resumed_from,
                "seconds": round(self.elapsed(), 3)}

    def _progress(self, stats: dict[str, Any]) -> None:
        g = self.generation
        elapsed = max(self.elapsed(), 1e-6)
        rate = (g - (self.resumed_from or 0)) / max(time.perf_counter() - self.started, 1e-6)
        eta = (self.total - g) / rate if self.total and rate else None
        label = " ".join(f"{k} {_short(v)}" for k, v in list(stats.items())[:3])
        self.ctx.emit("generation", {"progress": {"total": self.total, "done": g, "rate": round(rate, 2),
                                                  "eta": eta, "label": label, "elapsed": elapsed,
                                                  "unit": "generations"}})
        if time.perf_counter() - self.published >= PUBLISH_EVERY:
            self._publish(final=False)

    def _publish(self, final: bool, force: bool = False) -> None:
        if not final and not force and time.perf_counter() - self.published < PUBLISH_EVERY:
            return
        self.published = time.perf_counter()
        from .report import markdown

        try:
            self.units.publish(self.step.id, markdown(self.step.id, self.total, self.history, self.analyses,
                                                      self.chart, final))
        except Exception as exc:  # noqa: BLE001 - the UI's report is not worth stopping the loop for
            self.ctx.emit("warning", {"message": f"could not update the loop's report in Prefect: {exc}"})


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _count(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmflowError(f"loop.generations must be a positive integer, got {value!r}")
    return value


def _stats(value: Any, ref: str) -> dict[str, Any]:
    """A generation's stats as a JSON-safe mapping (a bare number is {"value": n})."""
    if value is None:
        return {}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"value": value}
    if not isinstance(value, dict):
        raise UserCodeError(f"{ref} returned {type(value).__name__}: a generation's stats are a dict "
                            "(e.g. {'best': 1.2, 'mean': 3.4}) or a number")
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return _snapshot(value)
    return value


def _read_stats(path: Path, upto: int) -> list[dict[str, Any]]:
    """Each generation's stats up to `upto` (a line torn by a kill, or past the state, is left out)."""
    found: dict[int, dict[str, Any]] = {}
    for entry in jsonl.read(path):
        g, stats = entry.get("g"), entry.get("stats")
        if isinstance(g, int) and isinstance(stats, dict) and g <= upto:
            found[g] = {"generation": g, **stats}
    return [found[g] for g in sorted(found)]
