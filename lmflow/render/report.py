"""Text for the terminal: progress lines, the final table, the plan. Pure functions."""

from __future__ import annotations

from typing import Any

from ..backends import backend_class
from ..engine.records import RunResult, StepRecord
from ..spec.model import Spec
from ..steps import get_kind
from .text import short, size_text, whole

MARK = {"completed": "ok", "cached": "ok", "failed": "FAILED", "skipped": "skipped"}


def seconds(value: float) -> str:
    """600 -> 10m, 604800 -> 7d, 2.5 -> 2.5s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value:g}s"


def progress_line(record: StepRecord) -> str:
    if record.status == "running":
        return f"  … {record.id} ({record.kind})"
    cached = " (cached)" if record.status == "cached" else (
        " (cached answer)" if record.meta.get("cache") == "hit" else "")
    answered = record.answered_by or {}
    if answered.get("link"):
        cached += f" (answered by {answered['target']})"
    detail = short(record.output) if record.error is None else record.error.message
    if record.status == "skipped":
        detail = f"not run: {record.reason or 'an earlier step failed'}"
    elif record.items is not None:
        detail = f"{item_summary(record)}: {detail}"
    return f"  {MARK.get(record.status, record.status)} {record.id} {record.seconds:.2f}s{cached}: {detail}"


def item_summary(record: StepRecord) -> str:
    """`12 items: 10 completed, 2 cached` for a map step."""
    counts = record.items or {}
    parts = [f"{counts[k]} {k}" for k in ("completed", "cached", "failed", "skipped") if counts.get(k)]
    return f"{counts.get('total', 0)} items" + (f": {', '.join(parts)}" if parts else "")


def item_progress(step: str, progress: dict[str, Any]) -> str:
    """One plain progress line of a map, or of a kind that reports its own progress (a loop's
    generations: its `unit` and `label`), for logs and pipes; a terminal gets a bar."""
    eta = progress.get("eta")
    left = f", ~{eta:.0f}s left" if eta else ""
    failed = f", {progress['failed']} failed" if progress.get("failed") else ""
    unit = progress.get("unit", "items")
    label = f" {progress['label']}" if progress.get("label") else ""
    return (f"  {step}: {progress['done']}/{progress['total'] or '?'} {unit}{failed}{label} "
            f"({progress.get('rate', 0):.1f}/s{left})")


def table(result: RunResult, width: int | None = None) -> str:
    """One row per step; an output is previewed, an error or a reason is shown whole (wrapped)."""
    rows = [("step", "kind", "status", "time", "cached", "result")]
    for s in result.steps:
        outcome = short(s.output) if s.status in ("completed", "cached") else (
            s.error.message if s.error else s.reason or "")
        if s.items is not None and s.status != "skipped":
            outcome = f"[{item_summary(s)}] {outcome}"
        cached = "step" if s.status == "cached" else "answer" if s.meta.get("cache") == "hit" else "no"
        rows.append((s.id, s.kind, s.status, f"{s.seconds:.2f}s", cached, outcome))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    indent = sum(widths) + 2 * 5  # where the result column starts
    lines = [whole("".join(c.ljust(w + 2) for c, w in zip(r[:5], widths, strict=True)), r[5], indent, width)
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(line.rstrip() for line in lines)


def errors(result: RunResult, limit: int = 30, width: int | None = None) -> str:
    """Every failed attempt and skipped link (also of steps that answered in the end), and every
    map item that failed; each message whole, since its fix is at its end."""
    lines = []
    for e in result.errors():
        attempt = f" attempt {e['attempt']}" if e.get("attempt") else ""
        target = f" {e['target']}" if e.get("target") else ""
        where = f"  {e['step']}{target}{attempt}: {e['error_type']}: "
        lines.append(whole(where, str(e["message"]), 4, width))
    for s in result.steps:
        answered = s.answered_by
        if answered and answered["link"]:
            lines.append(f"  {s.id}: answered by {answered['target']} (fallback link {answered['link']})")
    if not lines:
        return ""
    more = (f"\n  ... and {len(lines) - limit} more (the run record lists them all)"
            if len(lines) > limit else "")
    return f"errors ({len(lines)}):\n" + "\n".join(lines[:limit]) + more


def footer(result: RunResult, width: int | None = None) -> str:
    counts: dict[str, int] = {}
    for s in result.steps:
        counts[s.status] = counts.get(s.status, 0) + 1
    parts = [f"{n} {status}" for status, n in counts.items()]
    text = errors(result, width=width)
    text = (text + "\n" if text else "") + (
        f"{len(result.steps)} steps: {', '.join(parts)} in {result.seconds:.1f}s")
    cache = result.stats.get("response_cache") or {}
    if cache.get("hits") or cache.get("misses") or cache.get("errors"):
        text += (f"\nresponse cache: {cache['hits']} hits, {cache['misses']} misses"
                 + (f", unusable: {cache['errors'][0]}" if cache.get("errors") else ""))
    text += f"\nrun record: {result.record_path}"
    if result.api_url and result.flow_run_id:
        text += f"\nPrefect UI: {result.api_url.removesuffix('/api')}/runs/flow-run/{result.flow_run_id}"
    return text


def plan(spec: Spec) -> str:
    lines = [f"{spec.name}: {len(spec.steps)} steps ({spec.file})"]
    if spec.params:
        lines.append("params: " + ", ".join(f"{k}={v!r}" for k, v in spec.params.items()))
    for name, server in spec.servers.items():
        where = server.url or "started by lmflow on 127.0.0.1"
        lines.append(f"server {name}: {server.backend} ({where})")
    loaded_by_step = {s.options.get("model") for s in spec.by_id.values()
                      if s.kind in ("load_model", "reload_model")}
    for alias, model in spec.models.items():
        ctx = f", context {model.context_length}" if model.context_length else ""
        manages = backend_class(spec.servers[model.server].backend).manages_models
        if ctx and alias not in loaded_by_step and manages:
            ctx += " (loaded so at its first use)"
        chain = "".join(f", then {link.describe()}" for link in model.fallback)
        lines.append(f"model {alias}: {model.key} on {model.server}{ctx}{chain}")
    lines.append(f"breaker: skip a model for {seconds(spec.breaker.cooldown)} after {spec.breaker.failures} "
                 "failed calls in a row")
    if spec.guard:
        g = spec.guard
        short_of = [f"free memory < {size_text(g.min_free_memory)}" if g.min_free_memory else "",
                    f"idle CPU < {g.min_cpu_idle:.0%}" if g.min_cpu_idle is not None else ""]
        lines.append(f"guard: {g.action} when {' or '.join(x for x in short_of if x)}")
    if spec.response_cache:
        c = spec.response_cache
        ttl = f"ttl {seconds(c.ttl)}, " if c.ttl else ""
        lines.append(f"response cache: {ttl}at most {size_text(c.size_limit)}"
                     + (f" in {c.directory}" if c.directory else ""))
    for schedule in spec.schedules:
        lines.append(f"schedule: {schedule.describe()} (when served or deployed)")
    lines.append(f"at most {spec.max_parallel} steps or items at once (defaults.max_parallel)")
    lines.append("")
    for i, step in enumerate(spec.steps, 1):
        p = step.policy
        after = f" after {', '.join(step.depends_on)}" if step.depends_on else ""
        cache = ("step cache " + (f"ttl {seconds(p.cache_ttl)}" if p.cache_ttl else "on")) if p.cache \
            else "step cache off"
        uses = ""
        if "model" in step.options:
            uses = f" model={step.options['model']}"
        elif "function" in step.options:
            uses = f" {step.options['function']}"
        lines.append(f"{i:>3}. {step.id} [{step.kind}]{uses}{after}")
        if step.foreach is not None:
            source = step.foreach.value if step.foreach.source == "value" else \
                f"{step.foreach.source} {step.foreach.value}"
            grain = {"auto": "", "item": ", a task run per item"}.get(
                step.grain, f", chunks of {step.grain}")  # type: ignore[arg-type]
            if step.distribute:
                grain += ", chunks on task workers (distribute)"
            lines.append(f"     foreach {short(source, 60)}, {step.parallel or spec.max_parallel} at once, "
                         f"on_item_error {step.on_item_error}{grain}")
        if step.when is not None:
            lines.append(f"     when {getattr(step.when, 'text', step.when)}")
        growth = f" (x{p.timeout_growth:g} per attempt)" if p.timeout_growth != 1 else ""
        lines.append(f"     retries {p.retries}, timeout {p.timeout:g}s{growth}, {cache}")
        lines += get_kind(step.kind).plan_lines(step, spec.params)
    return "\n".join(lines)


class Progress:
    """What `lmflow run` prints while a run goes: a line per step, and for maps a live bar on a
    terminal (plain progress lines every few seconds when stderr is a file or a pipe).

    Called under the run recorder's lock, so lines from worker threads never interleave.
    """

    PLAIN_EVERY = 5.0  # seconds between plain progress lines of a map

    def __init__(self, stream: Any):
        import time

        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.maps: dict[str, dict[str, Any]] = {}  # active maps: their last progress
        self.printed: dict[str, float] = {}
        self.clock = time.monotonic
        self.bar_shown = False

    def line(self, text: str) -> None:
        self._clear_bar()
        self.stream.write(text + "\n")
        self._draw_bar()
        self.stream.flush()

    def event(self, event: str, data: dict[str, Any]) -> None:
        if event in ("warning", "cache_error"):
            where = f"{data['step']}: " if data.get("step") else ""
            self.line(f"  warning: {where}{data['message']}")
        elif event == "temporary_server_starting":
            self.line("lmflow: starting a temporary Prefect server for this run (10-20 s; "
                      "`lmflow server start` keeps one running)")
        elif event == "run_starting":
            api, spec = data["api"], data["spec"]
            where = {"temporary": "the temporary Prefect server",
                     "lmflow server": f"Prefect server {api.url}",
                     "PREFECT_API_URL": f"Prefect API {api.url}"}[api.source]
            self.line(f"lmflow: running {spec.name} ({len(spec.steps)} steps, {data['max_parallel']} at "
                      f"once) on {where}")
        elif event == "backend_starting" and data.get("message"):
            self.line(f"  {data['message']}")
        elif event in ("step_started", "step_finished"):
            record = data["step"]
            if event == "step_finished":
                self.maps.pop(record.id, None)
            self.line(progress_line(record))
        elif event == "item_finished":
            self._item(data["step"].id, data["progress"])
        elif event == "generation":
            self._item(data["step"], data["progress"])
        elif data.get("line"):  # a kind's own line (a loop's analysis), in its words
            self.line(data["line"])

    def _item(self, step: str, progress: dict[str, Any]) -> None:
        if not progress:
            return
        self.maps[step] = progress
        if self.tty:
            self._clear_bar()
            self._draw_bar()
            self.stream.flush()
            return
        now = self.clock()
        if progress["done"] == progress["total"] or now - self.printed.get(step, 0.0) >= self.PLAIN_EVERY:
            self.printed[step] = now
            self.line(item_progress(step, progress))

    def _bar(self, step: str, progress: dict[str, Any], width: int = 24) -> str:
        total = progress["total"]
        filled = int(width * progress["done"] / max(total, 1)) if total else 0
        eta = progress.get("eta")
        failed = f" {progress['failed']} failed" if progress.get("failed") else ""
        label = f" {progress['label']}" if progress.get("label") else ""
        left = f" ~{eta:.0f}s" if eta else ""
        return (f"  {step} [{'#' * filled}{'.' * (width - filled)}] {progress['done']}/{total or '?'}"
                f"{failed}{label} {progress.get('rate', 0):.1f}/s{left}")

    def _draw_bar(self) -> None:
        if self.tty and self.maps:
            self.stream.write(" |".join(self._bar(s, p) for s, p in self.maps.items()))
            self.bar_shown = True

    def _clear_bar(self) -> None:
        if self.bar_shown:
            self.stream.write("\r\x1b[K")
            self.bar_shown = False

    def close(self) -> None:
        self.maps.clear()
        self._clear_bar()
        self.stream.flush()
