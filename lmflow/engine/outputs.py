"""A map's output, written to a file in lmflow's home as its items finish and read back on demand.

A map of 200,000 items must not hold 200,000 answers in memory, nor pass them around as one
value. `OutputWriter` appends each item's output to `runs/<run>/<step>.jsonl` in input order
(an item that finishes early waits in a buffer for the ones before it), noting where each line
starts. `MapOutput` is the step's output from then on: a read-only sequence over that file that
templates, conditions and a later `foreach` index and iterate like a list, reading a line when
it is asked for. A whole reference in a step's options (`args: {rows: "${{ steps.m.output }}"}`)
is given a real list (lmflow.spec.templates); a later map over it streams it. The run's record
and `--json` hold the list itself, written row by row (`write_json`). `MapItems` puts the
map's items next to it (`steps.X.items`): the writer notes the input position of each line.
"""

from __future__ import annotations

import json
import re
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ..datasets import BrokenRow, Rows

#: an item with no place in the output (skipped, or failed with on_item_error: skip)
NOTHING = object()


class MapOutput(Rows):
    """The outputs of a map's items, in input order, from the file its `OutputWriter` wrote."""

    def __init__(self, path: Path, starts: array) -> None:  # noqa: D107 - indexed by its writer
        self.path, self.name = path, path.name
        self._starts, self._lines = starts, array("L")
        self._lock = threading.Lock()
        self._file = None

    def _parse(self, file: IO[bytes], index: int) -> Any:
        return json.loads(file.readline())

    def reference(self) -> dict[str, Any]:
        """What a journal line says of it: where it is and how many items it holds."""
        return {"file": str(self.path), "items": len(self)}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, bytes)) or not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment] - as a list's

    def __repr__(self) -> str:
        return f"MapOutput({len(self)} items in {self.path})"

    def __deepcopy__(self, memo: dict[int, Any]) -> MapOutput:
        return self  # read-only (dataclasses.asdict copies a record's fields)


class MapItems(Sequence[Any]):
    """The items of a map next to its output: item i is the one whose output is output[i] (items
    skipped or left out by on_item_error: skip are not in either). Read from the map's items
    when asked for: a dataset on disk stays there; a row that could not be read is null."""

    def __init__(self, items: Sequence[Any], positions: array) -> None:
        self.items, self.positions = items, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self.items[self.positions[index]]
        return None if isinstance(item, BrokenRow) else item

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, bytes)) or not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment] - as a list's

    def __repr__(self) -> str:
        return f"MapItems({len(self)} of {self.items!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> MapItems:
        return self  # read-only


class OutputWriter:
    """Writes a map's item outputs to its file in input order, as they finish (in any order).

    Used from the scheduler's thread only. A failed write goes to `failed` (the run's recorder
    then starts nothing more); the rest of the output is not written."""

    def __init__(self, path: Path, failed: Callable[[Path, OSError], None]) -> None:
        self.path, self.failed = path, failed
        self.starts = array("q")
        #: the input position of each item written (skipped ones are not)
        self.positions = array("q")
        self.pending: dict[int, Any] = {}
        self.next = 0
        self.offset = 0
        self.file: IO[bytes] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("wb")
        except OSError as exc:
            failed(path, exc)

    def put(self, index: int, output: Any) -> None:
        """Item `index`'s output (or NOTHING): written once every item before it is."""
        self.pending[index] = output
        while self.next in self.pending:
            value = self.pending.pop(self.next)
            self.next += 1
            if value is not NOTHING and self.file is not None:
                line = (json.dumps(value, ensure_ascii=False, default=str) + "\n").encode()
                try:
                    self.file.write(line)
                except OSError as exc:
                    self._close()
                    self.failed(self.path, exc)
                    continue
                self.starts.append(self.offset)
                self.positions.append(self.next - 1)
                self.offset += len(line)

    def _close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                self.failed(self.path, exc)
            self.file = None

    def close(self) -> MapOutput:
        """The output written (every item has been put)."""
        self._close()
        return MapOutput(self.path, self.starts)

    def inputs(self, items: Sequence[Any]) -> MapItems:
        """The map's `items` whose outputs were written, in the same order (`steps.X.items`)."""
        return MapItems(items, self.positions)

    def discard(self) -> None:
        """The map failed: it has no output."""
        self._close()
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- JSON with outputs in it

_TOKEN = "\x00lmflow-map-output-{}\x00"
_FOUND = re.compile(r'"\\u0000lmflow-map-output-(\d+)\\u0000"')


def write_json(stream: IO[str], data: Any, indent: int | None = 2) -> None:
    """`data` as JSON on `stream`, each MapOutput in it written row by row from its file (a
    list in the JSON, never all in memory); any other value JSON cannot hold as `str`."""
    outputs: list[MapOutput] = []

    def default(value: Any) -> Any:
        if isinstance(value, MapOutput):
            outputs.append(value)
            return _TOKEN.format(len(outputs) - 1)
        return str(value)

    text = json.dumps(data, indent=indent, default=default)
    position = 0
    for match in _FOUND.finditer(text):
        stream.write(text[position:match.start()])
        stream.write("[")
        for n, row in enumerate(_rows(outputs[int(match.group(1))])):
            stream.write(("," if n else "") + "\n" + row)
        stream.write("\n]")
        position = match.end()
    stream.write(text[position:])


def _rows(output: MapOutput) -> Iterator[str]:
    with output.path.open("rb") as file:
        for line in file:
            yield line.decode("utf-8").rstrip("\n")


def journal_default(value: Any) -> Any:
    """JSON for a journal line: a MapOutput as where it is (a journal line holds no big value)."""
    return value.reference() if isinstance(value, MapOutput) else str(value)
