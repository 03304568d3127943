"""The items a `foreach` runs over: a list, a dataset file (JSONL, JSON, CSV) or text files by glob.

Paths are relative to the spec's folder, like every other path in a spec. A JSONL or CSV file
is streamed, never held: opening it indexes where each row starts (12 bytes a row), and a row
is read and parsed when its item is prepared, so memory stays flat whatever the file's size.
A glob's files are read one at a time, the same way. A JSON file (one top-level array) is read
whole: a big dataset belongs in JSONL. A row that cannot be read (a broken JSONL line, a CSV row
wider than its header) is a `BrokenRow` in its place: that item fails with a message naming its
line, and the step's `on_item_error` decides.
"""

from __future__ import annotations

import csv
import json
import threading
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import (
    DatasetError,  # noqa: F401 - raised here, defined with the tree
    )
from .spec.model import Foreach
from .spec.templates import is_list

#: dataset files `foreach: {file: ...}` reads, one object per row
FORMATS = (".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class BrokenRow:
    """A dataset row that could not be read: its item fails with `error()`, the others run."""

    where: str  # `data.jsonl:12`
    problem: str

    def error(self) -> DatasetError:
        return DatasetError(f"{self.where}: {self.problem}")


def items(foreach: Foreach, spec_dir: Path, resolved: Any = None) -> Sequence[Any]:
    """The items, in order. `resolved` is the source already resolved: the list of a `value`
    source, the path or pattern of a `file` or `glob` that holds a reference."""
    if foreach.source == "value":
        if not is_list(resolved) or isinstance(resolved, tuple):
            kind = "null" if resolved is None else type(resolved).__name__
            raise DatasetError(f"foreach needs a list, got {kind}: {str(resolved)[:80]!r} (refer to a "
                               "list, e.g. a param holding one or a step whose output is one)")
        return resolved
    name = resolved if "${{" in foreach.value else foreach.value
    if not isinstance(name, str) or not name:
        raise DatasetError(f"foreach {foreach.source} {foreach.value!r} resolved to {name!r}, not a "
                           "path (pass a path relative to the spec's folder, e.g. -p dataset=data.jsonl)")
    if foreach.source == "file":
        return read_dataset(spec_dir / name, name)
    return read_glob(spec_dir, name)


def read_dataset(path: Path, name: str) -> Sequence[Any]:
    """Rows of a JSONL, JSON (a top-level list) or CSV file (each row an object of strings);
    JSONL and CSV rows are read when asked for (`Rows`)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DatasetError(f"cannot read {name} as a dataset: use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DatasetError(f"dataset not found: {name} (paths are relative to the spec's folder)")
    try:
        if suffix == ".jsonl":
            return JsonlRows(path, name)
        if suffix == ".csv":
            return CsvRows(path, name)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read dataset {name}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{name} holds a {type(data).__name__}, not a list of items "
                           "(use a top-level JSON array, or JSONL: one object per line)")
    return data


class Rows(Sequence[Any]):
    """The rows of a file, by index: where each starts (its byte offset) and its line number are
    indexed once; a row is read from the file when asked for. Safe to read from many threads."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self._starts = array("q")  # byte offset of each row
        self._lines = array("L")  # its line number, for messages
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        with path.open("rb") as file:
            self._index(file)

    def _index(self, file: IO[bytes]) -> None:
        raise NotImplementedError

    def _parse(self, file: IO[bytes], index: int) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        with self._lock:
            if self._file is None:
                self._file = self.path.open("rb")
            self._file.seek(self._starts[index])
            return self._parse(self._file, index)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict[str, Any]:  # a copy opens the file itself
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_file")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _file=None)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __del__(self) -> None:
        self.close()


class JsonlRows(Rows):
    """A JSONL file's rows: one JSON value a non-blank line."""

    def _index(self, file: IO[bytes]) -> None:
        offset = 0
        for number, line in enumerate(file, 1):
            if line.strip():
                self._starts.append(offset)
                self._lines.append(number)
            offset += len(line)

    def _parse(self, file: IO[bytes], index: int) -> Any:
        line = file.readline()
        try:
            return json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text (byte {exc.start} of the line)"
        except ValueError as exc:
            problem = f"not a JSON value ({exc}); JSONL has one JSON object per line"
        return BrokenRow(f"{self.name}:{self._lines[index]}", problem)


class CsvRows(Rows):
    """A CSV file's rows as objects keyed by its header (a quoted field may span lines)."""

    def _index(self, file: IO[bytes]) -> None:
        position = [0]

        def lines() -> Iterator[str]:
            for raw in file:  # (a bad byte only needs to keep its row's bounds: the row says so when read)
                position[0] += len(raw)
                yield raw.decode("utf-8", errors="replace")

        reader = csv.reader(lines())
        self.header = next(reader, None) or []
        start = position[0]
        for row in reader:
            if row:  # a blank line is no row (as csv.DictReader)
                self._starts.append(start)
                self._lines.append(reader.line_num)
            start = position[0]

    def _parse(self, file: IO[bytes], index: int) -> Any:
        where = f"{self.name}:{self._lines[index]}"
        try:  # the reader takes as many lines as the row spans
            row = next(csv.reader(line.decode("utf-8") for line in iter(file.readline, b"")))
        except UnicodeDecodeError as exc:
            return BrokenRow(where, f"not UTF-8 text (byte {exc.start} of the line)")
        except csv.Error as exc:
            return BrokenRow(where, f"not a CSV row ({exc})")
        if len(row) > len(self.header):
            return BrokenRow(where, "the row has more fields than the header")
        return dict(zip(self.header, row + [None] * (len(self.header) - len(row)), strict=True))


class GlobRows(Sequence[dict[str, str]]):
    """Text files matching a pattern, sorted by path: {path, name, text} each, read when asked for."""

    def __init__(self, spec_dir: Path, pattern: str):
        self.pattern = pattern
        self.paths = sorted(p for p in spec_dir.glob(pattern) if p.is_file())
        self.relative = [p.relative_to(spec_dir).as_posix() for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        path = self.paths[index]
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return BrokenRow(self.relative[index], f"not UTF-8 text (foreach glob {self.pattern!r} reads "
                             "text files; narrow the pattern)")
        except OSError as exc:
            return BrokenRow(self.relative[index], f"cannot be read ({exc.strerror or exc})")
        return {"path": self.relative[index], "name": path.name, "text": text}


def read_glob(spec_dir: Path, pattern: str) -> Sequence[dict[str, str]]:
    """Text files matching `pattern`, sorted by path (`GlobRows`)."""
    if Path(pattern).is_absolute():
        raise DatasetError(f"foreach glob {pattern!r} must be relative to the spec's folder")
    return GlobRows(spec_dir, pattern)
