"""The items a `foreach` runs over: a list, a dataset file (JSONL, JSON, CSV) or text files by glob.

Paths are relative to the spec's folder, like every other path in a spec. A row that cannot
be read (a broken JSONL line, a CSV row wider than its header) is a `BrokenRow` in its place:
that item fails with a message naming its line, and the step's `on_item_error` decides.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    DatasetError,  # noqa: F401 - raised here, defined with the tree
    )
from .spec.model import Foreach

#: dataset files `foreach: {file: ...}` reads, one object per row
FORMATS = (".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class BrokenRow:
    """A dataset row that could not be read: its item fails with `error()`, the others run."""

    where: str  # `data.jsonl:12`
    problem: str

    def error(self) -> DatasetError:
        return DatasetError(f"{self.where}: {self.problem}")


def items(foreach: Foreach, spec_dir: Path, resolved: Any = None) -> list[Any]:
    """The items, in order. `resolved` is the source already resolved, for a list or a reference."""
    if foreach.source == "value":
        if not isinstance(resolved, list):
            kind = "null" if resolved is None else type(resolved).__name__
            raise DatasetError(f"foreach needs a list, got {kind}: {str(resolved)[:80]!r} (refer to a "
                               "list, e.g. a param holding one or a step whose output is one)")
        return resolved
    if foreach.source == "file":
        return read_dataset(spec_dir / foreach.value, foreach.value)
    return read_glob(spec_dir, foreach.value)


def read_dataset(path: Path, name: str) -> list[Any]:
    """Rows of a JSONL, JSON (a top-level list) or CSV file (each row an object of strings)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DatasetError(f"cannot read {name} as a dataset: use one of {', '.join(FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"dataset not found: {name} (paths are relative to the spec's folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read dataset {name}: {exc}") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [BrokenRow(f"{name}:{reader.line_num}", "the row has more fields than the header")
                if None in row else row for row in reader]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DatasetError(f"{name} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise DatasetError(f"{name} holds a {type(data).__name__}, not a list of items "
                               "(use a top-level JSON array, or JSONL: one object per line)")
        return data
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            rows.append(BrokenRow(f"{name}:{number}", f"not a JSON value ({exc}); JSONL has one JSON "
                                  "object per line"))
    return rows


def read_glob(spec_dir: Path, pattern: str) -> list[dict[str, str]]:
    """Text files matching `pattern`, sorted by path: {path, name, text} each."""
    if Path(pattern).is_absolute():
        raise DatasetError(f"foreach glob {pattern!r} must be relative to the spec's folder")
    found = []
    for path in sorted(p for p in spec_dir.glob(pattern) if p.is_file()):
        relative = path.relative_to(spec_dir).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{relative} is not UTF-8 text (foreach glob {pattern!r} reads text "
                               "files; narrow the pattern)") from None
        found.append({"path": relative, "name": path.name, "text": text})
    return found
