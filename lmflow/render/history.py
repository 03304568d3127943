"""A run's history as text: the summary a run leaves in Prefect's UI, and `lmflow runs` / `lmflow runs
show`, from the runs lmflow.prefect.history reads back. Pure functions.

The summary is a table artifact, a row per step (`summary_rows`), with markdown above it
(`summary_description`); `lmflow runs show` prints those rows again, so they are read by the
same module that writes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .report import item_summary
from .text import short, whole

if TYPE_CHECKING:
    from ..engine.records import RunResult, StepRecord

#: columns of the summary table, in order
COLUMNS = ("step", "kind", "status", "seconds", "attempts", "cached", "answered by", "result", "errors")


# -- the summary a run writes (at the end of every flow run) -----------------------------------

def summary_rows(result: RunResult) -> list[dict[str, Any]]:
    """The run's terminal table as rows for a Prefect table artifact: one per step, errors whole."""
    errors = result.errors()
    rows = []
    for s in result.steps:
        status, reason = s.status, s.reason
        # at the flow's end nothing still runs: a step that does was stopped with the flow (as
        # `lmflow run` records it once the flow has returned, after this table is written)
        if status == "running":
            status, reason = "interrupted", "the flow stopped while it ran"
        elif status == "pending":
            status, reason = "skipped", "the flow stopped before it started"
        if status in ("completed", "cached"):
            outcome = short(s.output)
        else:
            outcome = s.error.message if s.error else reason or ""
        if s.items is not None and status != "skipped":
            outcome = f"[{item_summary(s)}] {outcome}"
        answered = s.answered_by or {}
        by = answered.get("target") or ""
        if by and answered.get("link"):
            by += f" (fallback {answered['link']})"
        rows.append({
            "step": s.id, "kind": s.kind, "status": status, "seconds": round(s.seconds, 3),
            "attempts": _attempts(s),
            "cached": "step" if s.status == "cached" else "answer" if s.meta.get("cache") == "hit" else "no",
            "answered by": by, "result": outcome,
            "errors": "\n".join(_error_line(e, s) for e in errors
                                if e["step"] == s.id or e["step"].startswith(s.id + "[")),
        })
    return rows


def _attempts(s: StepRecord) -> int:
    """Failed steps: their attempts; others: the task's runs or the model calls, whichever is more."""
    if s.error is not None:
        return s.error.attempts
    calls = sum(1 for e in s.errors if e.get("attempt")) + int(s.meta.get("attempts") or 0)
    return max(s.attempts, calls)


def _error_line(e: dict[str, Any], s: StepRecord) -> str:
    item = e["step"][len(s.id):]  # "[3]" for a map's item
    attempt = f"attempt {e['attempt']}" if e.get("attempt") else ""
    where = " ".join(x for x in (item, e.get("target") or "", attempt) if x)
    return f"{where + ': ' if where else ''}{e['error_type']}: {e['message']}"


def summary_description(result: RunResult) -> str:
    """Markdown above the table in the UI: the outcome, the spec's version, the params."""
    counts: dict[str, int] = {}
    for s in result.steps:
        counts[s.status] = counts.get(s.status, 0) + 1
    version = result.spec_version or {}
    where = "not in git"
    if version.get("commit"):
        where = f"commit `{version['commit'][:12]}`" + (" with local changes" if version.get("dirty") else "")
    return (f"**{result.run_id}**: {len(result.steps)} steps: "
            + ", ".join(f"{n} {status}" for status, n in counts.items())
            + f".\n\nSpec `{result.spec}` ({where}, sha256 `{str(version.get('sha256'))[:12]}`), "
            f"params `{json.dumps(result.params, default=str)}`.\n\n"
            f"`lmflow runs show {result.run_id}` prints this table; `lmflow rerun {result.run_id}` "
            "runs the same spec version with the same params.")


# -- runs read back: `lmflow runs`, `lmflow runs show` ------------------------------------------

@dataclass
class Run:
    """One run as the Prefect API knows it (its steps from its summary, else its task runs): what
    lmflow.prefect.history reads, and what `lmflow runs` and `runs show` print."""

    id: str
    name: str
    spec: str | None  # the spec's name (its `spec:` tag)
    state: str
    start: datetime | None
    end: datetime | None
    #: the spec's version from the run's tags: commit (12 hex), dirty, sha256 (12 hex)
    version: dict[str, Any]
    #: the flow run's parameters: spec_path, params (as given), refresh_cache, max_parallel
    parameters: dict[str, Any]
    ui_url: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    #: "summary" (the run's table artifact) or "task runs" (a run still going, or killed)
    steps_from: str = "summary"

    @property
    def seconds(self) -> float | None:
        if self.start is None:
            return None
        return ((self.end or datetime.now(timezone.utc)) - self.start).total_seconds()

    @property
    def failed(self) -> list[str]:
        """Ids of the steps that failed (a map's failed items count for their step)."""
        return list(dict.fromkeys(r["step"].split("[", 1)[0] for r in self.steps if r["status"] == "failed"))

    @property
    def cached(self) -> int:
        """Steps answered from the step cache."""
        return sum(1 for r in self.steps if r["status"] == "cached")

    @property
    def cached_answers(self) -> int:
        """Steps whose model answer came from the response cache."""
        return sum(1 for r in self.steps if r.get("cached") == "answer")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "start": self.start.isoformat() if self.start else None,
                "end": self.end.isoformat() if self.end else None, "seconds": self.seconds,
                "failed": self.failed, "cached": self.cached, "cached_answers": self.cached_answers}


def version_text(version: dict[str, Any]) -> str:
    """`abc123def456`, `abc123def456 dirty`, or `sha256:0123456789ab` outside git."""
    if version.get("commit"):
        return version["commit"] + (" dirty" if version.get("dirty") else "")
    return f"sha256:{version['sha256']}" if version.get("sha256") else "?"


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _duration(run: Run) -> str:
    seconds = run.seconds
    if seconds is None:
        return "-"
    text = f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return text + ("…" if run.end is None else "")


def runs_table(runs: list[Run]) -> str:
    """`lmflow runs`: one line per run."""
    if not runs:
        return "no lmflow runs found"
    rows = [("run", "state", "start", "duration", "failed", "cached step/answer", "spec")]
    for r in runs:
        rows.append((r.name, r.state, _when(r.start), _duration(r), ",".join(r.failed) or "-",
                     f"{r.cached}/{r.cached_answers}", version_text(r.version)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_text(run: Run, width: int | None = None) -> str:
    """`lmflow runs show`: the run, its spec version and params, then every step and its errors."""
    given = run.parameters.get("params")
    head = [
        f"run     {run.name} ({run.id})",
        f"state   {run.state}, started {_when(run.start)}, {_duration(run)}",
        f"spec    {run.spec or '?'}: {run.parameters.get('spec_path') or '?'} at {version_text(run.version)}"
        + (f" (sha256 {run.version['sha256']})" if run.version.get("commit") and run.version.get("sha256")
           else ""),
        "params  " + (json.dumps(given, default=str) + " (given; the rest are the spec's defaults)"
                      if given else "the spec's defaults"),
        f"UI      {run.ui_url}",
        "",
    ]
    if not run.steps:
        return "\n".join([*head, "no steps recorded yet"])
    if run.steps_from != "summary":
        head.append("(no summary: the run is still going, or stopped before its end; "
                    "steps as Prefect's task runs saw them)")
    names = ("step", "kind", "status", "time", "attempts", "cached", "answered by")
    rows = [names] + [(r["step"], r["kind"], r["status"], f"{r['seconds']:.2f}s", str(r["attempts"]),
                       r["cached"], r["answered by"] or "-") for r in run.steps]
    widths = [max(len(row[i]) for row in rows) for i in range(len(names))]
    indent = sum(widths) + 2 * len(names)
    lines = [whole("".join(c.ljust(w + 2) for c, w in zip(row, widths, strict=True)), result, indent, width)
             for row, result in zip(rows, ["result"] + [r["result"] for r in run.steps], strict=True)]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    errors = [(r["step"], line) for r in run.steps for line in r["errors"].splitlines() if line]
    if errors:
        lines.append(f"errors ({len(errors)}):")
        lines += [whole(f"  {step} ", line, 4, width) for step, line in errors]
    return "\n".join([*head, *(line.rstrip() for line in lines)])


def item_text(run: Run, item: dict[str, Any]) -> str:
    """`lmflow runs show RUN --item STEP[N]`: one map item as the run's journal has it."""
    name = f"{item['step']}[{item['item']}]"
    how = f"{item['status']} in {item.get('seconds', 0):.2f}s"
    if item.get("answered_by"):
        how += f", answered by {item['answered_by']}"
    lines = [f"run      {run.name} ({run.id})", f"item     {name}: {how}"]
    def block(value: Any) -> str:  # a value over lines, under the first
        return json.dumps(value, indent=2, default=str).replace("\n", "\n         ")

    if item.get("chunks"):  # a distributed map's: the chunk it went out in, and who took it
        lines.append("ran in   " + ", then ".join(f"{c['chunk']} on {c['worker']}" for c in item["chunks"]))
    if "output" in item:
        lines.append("output   " + block(item["output"]))
    error = item.get("error")
    if error:
        attempts = error.get("attempts") or 1
        lines.append(f"error    {error.get('error_type')}: {error.get('message')}"
                     + (f" ({attempts} attempts)" if attempts > 1 else ""))
    for earlier in item.get("errors") or ():  # what failed before a fallback answered
        lines.append(f"fell back {json.dumps(earlier, default=str)}")
    if item.get("reason"):
        lines.append(f"reason   {item['reason']}")
    if "options" in item:
        lines.append("options  " + block(item["options"]))
    else:
        lines.append("options  kept for failed items only (a completed item's would grow a big map's "
                     "journal)")
    return "\n".join(lines)
