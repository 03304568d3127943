"""A context probe as text: the verdicts in words (`lmflow probe`, the probe_context step's warnings),
the lines and table `lmflow probe` prints, and the report for Prefect's UI with its chart."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from ..probe import Attempt, ProbeReport, Trial


def loadable_text(report: ProbeReport) -> str:
    """The loadable maximum in words (the CLI's and the report's)."""
    if report.loadable_max is None:
        smallest = report.attempts[0].size if report.attempts else "the smallest size"
        return f"loads at no size tried (not even {smallest})"
    return f"loads at most {report.loadable_max}"


def working_text(report: ProbeReport) -> str:
    """The working maximum in words (the CLI's and the report's): a search that found none says so
    plainly, with what the smallest fill got and what `probed` will do with the record."""
    if report.working_max is not None:
        return (f"works (pass key found at start, middle and end) up to {report.working_max} prompt "
                f"tokens at context {report.loadable_max}")
    if not report.trials:
        return "working maximum not measured (load only, or nothing loads)"
    smallest = min(t.fill for t in report.trials)
    got = ", ".join(f"{t.position} {t.outcome}" for t in report.trials if t.fill == smallest)
    return (f"NO WORKING CONTEXT FOUND at context {report.loadable_max}: even at the smallest fill, "
            f"{smallest} prompt tokens, the pass key was not returned at start, middle and end ({got}). "
            "`context_length: probed` will refuse this record; \"probed: loadable\" loads at the "
            f"loadable maximum ({report.loadable_max}) instead")


# -- `lmflow probe` ----------------------------------------------------------------------------

def registry_line(entry: dict[str, Any]) -> str:
    """One finished probe of the registry (`lmflow probe --list`)."""
    about = ", ".join(str(entry[k]) for k in ("variant", "version") if entry.get(k))
    working = entry["working_max"] or ("NONE FOUND" if entry["working_measured"] else "not measured")
    return (f"{entry['model']}  {entry['server']}  loadable max {entry['loadable_max'] or 'none'}  "
            f"working max {working}" + (f"  ({about})" if about else ""))


def attempt_line(attempt: Attempt) -> str:
    """One load as it ends (on stderr while the probe goes)."""
    extra = f" ({attempt.detail})" if attempt.detail else ""
    return f"  load at {attempt.size:>6}: {attempt.outcome} in {attempt.seconds:.2f}s{extra}"


def trial_line(t: Trial) -> str:
    """One fill of the working search as it ends (on stderr while the probe goes)."""
    return (f"  fill {t.fill:>6} ({t.position:<6}): {t.outcome}, "
            f"{t.prompt_tokens} tokens in {t.seconds:.2f}s")


def loadable_line(model: str, report: ProbeReport, granularity: int) -> str:
    """The result's first line: the declared maximum and the loadable one."""
    return (f"{model}: declared {report.declared_max}, {loadable_text(report)} "
            f"(granularity {granularity}, {report.loads} loads)")


def working_table(model: str, report: ProbeReport) -> str:
    """The working maximum in words, then a row per fill level."""
    lines = [f"{model}: {working_text(report)}",
             "   fill  outcome  prompt tokens  first token  seconds  tokens/s"]
    for fill in sorted({t.fill for t in report.trials}):
        rows = [t for t in report.trials if t.fill == fill]
        outcome = "ok" if all(t.outcome == "ok" for t in rows) else ",".join(
            sorted({t.outcome for t in rows if t.outcome != "ok"}))
        speed = max((t.tokens_per_second or 0) for t in rows)
        first = max((t.first_token_seconds or 0) for t in rows)
        lines.append(f"{fill:>7}  {outcome:<7}  {rows[0].prompt_tokens or '?':>13}  {first:>10.2f}s  "
                     f"{max(t.seconds for t in rows):>7.2f}  {speed:>8}")
    return "\n".join(lines)


def chart_line(path: Path) -> str:
    """Where the chart was saved."""
    return f"chart (pass/fail and speed against the fill): {path}"


# -- the chart, and the report for Prefect's UI ------------------------------------------------

def _by_fill(report: ProbeReport) -> list[tuple[int, bool, float, float | None]]:
    """(fill, passed at every position, best prompt tokens/s, slowest first token) per fill level."""
    rows = []
    for fill in sorted({t.fill for t in report.trials}):
        at = [t for t in report.trials if t.fill == fill]
        firsts = [t.first_token_seconds for t in at if t.first_token_seconds is not None]
        rows.append((fill, all(t.outcome == "ok" for t in at),
                     max((t.tokens_per_second or 0.0) for t in at), max(firsts) if firsts else None))
    return rows


def chart_svg(report: ProbeReport) -> str | None:
    """Pass/fail and prompt speed against the fill, as a small self-contained SVG (no plotting
    library: the chart has two series and a handful of points)."""
    rows = _by_fill(report)
    if not rows:
        return None
    width, height, left, right, top, bottom = 640, 280, 60, 60, 30, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    x_max = max(report.loadable_max or 0, rows[-1][0]) or 1
    speed_max = max(r[2] for r in rows) or 1.0
    first_max = max((r[3] or 0.0) for r in rows) or 1.0

    def x(fill: float) -> float:
        return left + plot_w * fill / x_max

    def y(value: float, top_value: float) -> float:
        return top + plot_h * (1 - value / top_value)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13">{html.escape(report.key["model"])}: pass key at '
           f'start, middle and end (green pass, red fail) and prompt speed</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
           f'<line x1="{left + plot_w}" y1="{top}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="gray"/>']
    for i in range(5):
        fill = x_max * i / 4
        out.append(f'<text x="{x(fill):.1f}" y="{top + plot_h + 15}" text-anchor="middle">{fill:.0f}</text>')
        out.append(f'<text x="{left - 5}" y="{y(speed_max * i / 4, speed_max) + 4:.1f}" '
                   f'text-anchor="end">{speed_max * i / 4:.0f}</text>')
        out.append(f'<text x="{left + plot_w + 5}" y="{y(first_max * i / 4, first_max) + 4:.1f}" '
                   f'fill="gray">{first_max * i / 4:.2f}</text>')
    out += [f'<text x="{left + plot_w / 2}" y="{height - 12}" text-anchor="middle">'
            'prompt tokens (fill)</text>',
            f'<text x="12" y="{top + plot_h / 2}" transform="rotate(-90 12 {top + plot_h / 2})" '
            f'text-anchor="middle">prompt tokens/s</text>',
            f'<text x="{width - 8}" y="{top + plot_h / 2}" transform="rotate(90 {width - 8} '
            f'{top + plot_h / 2})" text-anchor="middle" fill="gray">first token (s), dashed</text>']
    if report.working_max:
        wx = x(report.working_max)
        out.append(f'<line x1="{wx:.1f}" y1="{top}" x2="{wx:.1f}" y2="{top + plot_h}" stroke="green" '
                   f'stroke-dasharray="2,3"/><text x="{wx + 3:.1f}" y="{top + 12}" fill="green">'
                   f'works up to {report.working_max}</text>')
    else:
        out.append(f'<text x="{left + 5}" y="{top + 12}" fill="crimson">no working context found</text>')
    speed_line = " ".join(f"{x(f):.1f},{y(s, speed_max):.1f}" for f, _, s, _ in rows)
    out.append(f'<polyline points="{speed_line}" fill="none" stroke="steelblue" stroke-width="2"/>')
    firsts = " ".join(f"{x(f):.1f},{y(t, first_max):.1f}" for f, _, _, t in rows if t is not None)
    if firsts:
        out.append(f'<polyline points="{firsts}" fill="none" stroke="gray" stroke-dasharray="5,3"/>')
    for fill, passed, speed, _ in rows:
        out.append(f'<circle cx="{x(fill):.1f}" cy="{y(speed, speed_max):.1f}" r="5" '
                   f'fill="{"seagreen" if passed else "crimson"}"><title>{fill} tokens: '
                   f'{"pass" if passed else "fail"}, {speed:.0f} tokens/s</title></circle>')
    out.append("</svg>")
    return "\n".join(out)


def _cell(answer: str, width: int = 40) -> str:
    """An answer shortened for a table cell (the journal keeps it whole)."""
    flat = " ".join(answer.split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def report_markdown(report: ProbeReport) -> str:
    """The probe as markdown (a Prefect artifact in the UI): the chart as an embedded image, a text
    chart for terminals, and the tables."""
    import base64

    working = working_text(report)
    if report.working_max is None and report.trials:
        working = f"**{working}**"  # the one line a reader must not miss
    lines = [f"### Context probe: {report.key['model']} on {report.key['server']}", "",
             f"Declared {report.declared_max}; {loadable_text(report)} (granularity {report.granularity}).",
             "", f"{working[0].upper()}{working[1:]}.", "",
             "| load at | outcome | applied | seconds |", "|---|---|---|---|"]
    lines += [f"| {a.size} | {a.outcome} | {a.actual or ''} | {a.seconds:.2f} |" for a in report.attempts]
    svg = chart_svg(report)
    if svg is not None:
        encoded = base64.b64encode(svg.encode()).decode()
        lines += ["", f"![pass/fail and speed against the fill](data:image/svg+xml;base64,{encoded})"]
        lines += ["", "Pass/fail and prompt speed against the fill:", "", "```"]
        rows = _by_fill(report)
        top = max(r[2] for r in rows) or 1
        for fill, passed, speed, _ in rows:
            bar = "#" * max(1, round(30 * speed / top))
            lines.append(f"{fill:>7} {'pass' if passed else 'FAIL'} {bar:<30} {speed:.0f} tok/s")
        lines += ["```"]
        lines += ["", "| fill (tokens) | position | outcome | prompt tokens | first token (s) | seconds | "
                  "tokens/s | answer |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t.fill} | {t.position} | {t.outcome} | {t.prompt_tokens or ''} | "
                  f"{'' if t.first_token_seconds is None else f'{t.first_token_seconds:.2f}'} | "
                  f"{t.seconds:.2f} | {t.tokens_per_second or ''} | {_cell(t.answer)} |"
                  for t in report.trials]
    return "\n".join(lines)
