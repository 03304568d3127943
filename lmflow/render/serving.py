"""The lines `lmflow serve` and `lmflow worker` print as they go: a run started, a run ended, the
stop. lmflow.prefect.serving reports them and the commands pass them in."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from .server import duration


class Report(Protocol):
    """A run started or ended: lmflow.prefect.serving.RunReport."""

    state: str
    ended: bool
    name: str
    spec: str
    url: str
    message: str
    scheduled: datetime | None
    seconds: float | None


def run_line(report: Report, now: datetime | None = None) -> str:
    """`12:00:02 Running napper run witty-lemur (scheduled for 12:00:00)  URL` when a run starts,
    `12:00:14 Completed napper run napper-20261207T120002Z-4242 after 12s  URL` when it ends."""
    text = f"{_clock(now)} {report.state} {report.spec} run {report.name}"
    if report.scheduled is not None:
        text += f" (scheduled for {report.scheduled.astimezone():%H:%M:%S})"
    if report.seconds is not None:
        text += f" after {duration(report.seconds)}"
    if report.message:
        text += f": {report.message.strip().splitlines()[0]}"
    return f"{text}  {report.url}"


def stopping(signal: str, runs: int, now: datetime | None = None) -> str:
    """The stop has begun: what it does to the runs in progress."""
    held = f"cancelling {runs} run{'s' if runs != 1 else ''} in progress" if runs else "no run in progress"
    return f"{_clock(now)} stopping ({signal}): {held}"


def stopped(now: datetime | None = None) -> str:
    return f"{_clock(now)} stopped"


def _clock(now: datetime | None) -> str:
    return f"{now or datetime.now():%H:%M:%S}"
