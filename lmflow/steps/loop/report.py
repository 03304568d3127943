"""A loop's report: for Prefect's UI the optimiser's progress as a chart, with the coach's
interventions marked, and a table of the analyses; for the terminal a line per analysis."""

from __future__ import annotations

import json
from typing import Any

from ...render.charts import data_uri, line_chart_svg
from ...render.text import short

MAX_SERIES = 4


def chart_fields(history: list[dict[str, Any]], chosen: list[str] | None) -> list[str]:
    """The stats to draw: the spec's `chart:`, else the first numeric fields of the stats."""
    if chosen:
        return chosen
    if not history:
        return []
    return [k for k, v in history[-1].items()
            if k != "generation" and isinstance(v, (int, float)) and not isinstance(v, bool)][:MAX_SERIES]


def markdown(step: str, total: int | None, history: list[dict[str, Any]], analyses: list[dict[str, Any]],
             chosen: list[str] | None, final: bool) -> str:
    done = history[-1]["generation"] if history else 0
    where = f"{done}/{total}" if total else str(done)
    lines = [f"# {step}: generation {where}" + ("" if final else " (running)"), ""]
    fields = chart_fields(history, chosen)
    series: dict[str, list[float | None]] = {f: [] for f in fields}
    for entry in history:  # generations 1..n; a resumed loop has them all
        for f in fields:
            value = entry.get(f)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            series[f].append(value if number else None)
    marks = [(a["applied_at"], f"{a['applied_at']}: coach (asked at {a['asked_at']})")
             for a in analyses if a.get("applied_at")]
    svg = line_chart_svg(series, marks=marks, title=f"{step}: " + ", ".join(fields)) if fields else None
    if svg is not None:
        lines += [f"![{', '.join(fields)} per generation; coach advice marked]({data_uri(svg)})", ""]
    if analyses:
        lines += ["| asked at | applied at | mode | status | answered by | advice | changes |",
                  "|---|---|---|---|---|---|---|"]
        for a in analyses:
            answered = ", ".join(s["answered_by"]["target"] for s in a.get("steps", {}).values()
                                 if s.get("answered_by"))
            changes = "; ".join(_change(c) for c in a.get("changes", [])) or (a.get("error") or "")
            lines.append(f"| {a['asked_at']} | {a.get('applied_at') or '-'} | {a['mode']} | {a['status']} | "
                         f"{answered or '-'} | {_cell(a.get('advice'))} | {_cell(changes)} |")
    return "\n".join(lines)


def _change(change: dict[str, Any]) -> str:
    if "function" in change:
        return f"applied by {change['function']}"
    text = f"{change['field']}: {change['status']}"
    if "value" in change and change["status"] != "absent":
        text += f" {change.get('previous')!r} -> {change['value']!r}"
    if change.get("note"):
        text += f" ({change['note']})"
    return text


def _cell(value: Any, width: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def analysis_line(step: str, analysis: dict[str, Any]) -> str:
    """`evolve@5: applied at 5 by model coach: mutation_rate 0.05 -> 0.2` for a loop's analysis."""
    where = f"{step}@{analysis['asked_at']}"
    answered = ", ".join(s["answered_by"]["target"] for s in analysis.get("steps", {}).values()
                         if s.get("answered_by"))
    by = f" (answered by {answered})" if answered else ""
    status = analysis["status"]
    if analysis.get("applied_at") is not None:
        status = f"applied at {analysis['applied_at']}"
    changes = []
    for c in analysis.get("changes", []):
        if "function" in c:
            changes.append(f"by {c['function']}")
        elif c["status"] == "rejected":
            changes.append(f"{c['field']} rejected ({c.get('note')})")
        elif c["status"] not in ("absent", "unchanged"):
            note = f" ({c['note']})" if c.get("note") else ""
            was, now = short(c.get("previous"), 12), short(c.get("value"), 12)
            changes.append(f"{c['field']} {was} -> {now}{note}")
    detail = "; ".join(changes) or analysis.get("error") or (
        "no change" if analysis.get("applied_at") is not None else "")
    took = f" [{analysis.get('seconds') or 0:.1f}s]"
    return f"  {where}: {status}{by}" + (f": {detail}" if detail else "") + took
