"""The JSON-lines files lmflow writes and reads back (run journals, probe journals, loop stats).

Every one of them is read here, defensively: a file is appended to by a process that can be
killed mid-line, and a disk can fill or a person can edit one. A last line torn by a kill is
left out quietly (it is expected); any other line that is not a JSON object (invalid UTF-8,
not JSON, a bare `42`) is left out with a warning that names the file and the line, so one
bad line never stops a run or a command that reads the rest. A line torn anywhere is never
a JSON object (an object ends with its last byte), so a torn line is never trusted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_LOG = logging.getLogger("lmflow")


def read(path: Path, warn: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines file, in order (none when it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        reason = None
        try:
            entry = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 at byte {exc.start}"
        except ValueError:
            reason = "not JSON"
        else:
            if isinstance(entry, dict):
                yield entry
                continue
            reason = f"a JSON {type(entry).__name__}, not an object"
        if number == len(lines) and reason == "not JSON":
            continue  # the last line, without its newline: torn by a kill while it was written
        (warn or _LOG.warning)(f"{path}:{number}: skipped a line that lmflow cannot read ({reason})")


def starts(path: Path, marker: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """Where each line holding `marker` starts, and its object; lines that are not a JSON object
    are left out quietly (`read` warns of them). What a reader keeps to read one line later."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return
    with file:
        offset = 0
        for raw in file:
            if marker in raw:
                entry = _object(raw)
                if entry is not None:
                    yield offset, entry
            offset += len(raw)


def line_at(path: Path, offset: int) -> dict[str, Any] | None:
    """The object of the line that starts at `offset` (from `starts`), or None."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return _object(file.readline())
    except OSError:
        return None


def _object(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except ValueError:  # (UnicodeDecodeError is one)
        return None
    return entry if isinstance(entry, dict) else None


def exact(value: Any) -> bool:
    """Whether a JSON line gives `value` back as it is (not a tuple, a set, an object written as its
    `str`, a dict with keys that are not strings): what may be read back in its place."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    try:
        if kind is list:
            return all(exact(v) for v in value)
        if kind is dict:
            return all(type(k) is str and exact(v) for k, v in value.items())
    except RecursionError:
        return False
    return False


def append(path: Path, entry: dict[str, Any]) -> None:
    """Add one object as a line of its own, also after a last line torn by a kill (which would
    otherwise swallow it)."""
    with path.open("a+b") as out:
        torn = out.tell() > 0 and (out.seek(-1, 2), out.read(1))[1] != b"\n"
        out.write((b"\n" if torn else b"") + json.dumps(entry, default=str).encode() + b"\n")
