"""A spec's `schedules:` (cron, interval or rrule, each with its params)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import Problem
from .hints import suggest as _suggest
from .loader import Document, PathT
from .model import (
    ScheduleSpec,
    parse_duration,
)
from .params import coerce_param, param_decl

_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?#-]+$")


def _cron_problem(line: str) -> str | None:
    """Why a cron line is not one (Prefect checks it fully at deploy time; validate stays light)."""
    fields = line.split()
    if len(fields) == 1 and fields[0].lower() in _CRON_MACROS:
        return None
    if len(fields) != 5:
        return f"a cron line has 5 fields (minute hour day month weekday), this one has {len(fields)}"
    bad = next((f for f in fields if not _CRON_FIELD.match(f)), None)
    return f"'{bad}' is not a cron field" if bad else None


def check_schedules(doc: Document, problems: list[Problem]) -> tuple[ScheduleSpec, ...]:
    """`schedule:` (one or a list): exactly one of cron or interval, a real time zone, known params."""
    raw = doc.data.get("schedule")
    if raw is None:
        return ()
    declared = doc.data.get("params") if isinstance(doc.data.get("params"), dict) else {}

    def problem(path: PathT, message: str, hint: str | None = None) -> None:
        problems.append(doc.problem(path, message, hint))

    return schedules(raw, declared, problem, listed=isinstance(raw, list))


def schedules(raw: Any, declared: dict[str, Any], problem: Any, *, listed: bool = True
              ) -> tuple[ScheduleSpec, ...]:
    """Schedules from their YAML form (a spec's or the command line's); `problem(path, message,
    hint)` is told what is wrong with each."""
    import zoneinfo

    found = []
    for i, entry in enumerate(raw if isinstance(raw, list) else [raw]):
        path: PathT = ("schedule", i) if listed else ("schedule",)
        if not isinstance(entry, dict):
            continue  # the schema reports it
        if ("cron" in entry) == ("interval" in entry):
            problem(path, "a schedule needs exactly one of cron or interval",
                    "e.g. {cron: '0 6 * * *'} or {interval: 1h}")
            continue
        cron = entry.get("cron")
        if isinstance(cron, str) and (why := _cron_problem(cron)):
            problem(path + ("cron",), why, "e.g. '0 6 * * 1-5' is 06:00 on weekdays")
        interval = entry.get("interval")
        try:
            seconds = parse_duration(interval) if interval is not None else None
        except ValueError as exc:
            problem(path + ("interval",), str(exc), "e.g. 15m, 1h, 1d")
            seconds = None
        zone = entry.get("timezone")
        if isinstance(zone, str):
            try:
                zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problem(path + ("timezone",), f"unknown time zone {zone!r}",
                        "use an IANA name such as Europe/Berlin or UTC")
        params = {}
        given = entry.get("params") if isinstance(entry.get("params"), dict) else {}
        for name, value in given.items():
            if name not in declared:
                problem(path + ("params", name), f"unknown parameter '{name}'",
                        _suggest(name, declared) or "declare it under params")
                continue
            try:
                params[name] = coerce_param(name, value, param_decl(None, name, declared[name], []))
            except ValueError as exc:
                problem(path + ("params", name), str(exc))
        found.append(ScheduleSpec(cron=cron if isinstance(cron, str) else None, interval=seconds,
                                  timezone=zone if isinstance(zone, str) else None, params=params,
                                  active=entry.get("active", True) is not False))
    return tuple(found)

