"""What `when:` expressions compute with: key lookups, the limits on results, and the functions.

Functions over lists (`any all count sum pluck where`) take a list or a sequence read on
demand (a big map's output on disk, `MapOutput`) and read it once, item by item: they never
copy it. `pluck` and `where` give a `Picked` view, not a list: the items they stand for are
read again when asked for, and a `where` keeps only the positions of those that matched
(8 bytes each). So `any(pluck(steps.m.output, 'urgent'))` over a 200,000-item map holds one
item at a time.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import simpleeval
from simpleeval import IterableTooLong, NumberTooHigh

from .hints import known_keys
from .templates import is_list
from .templates import kind_of as kind

MAX_DIGITS = 4300  # as Python's int <-> str conversion limit
_TOO_BIG = 10**MAX_DIGITS


class NullUsed(TypeError):
    """An operation or function was given null; `why` says where each null came from, if known."""

    def __init__(self, message: str, why: Sequence[str] = ()):
        super().__init__(message)
        self.why = list(why)


class Refused(TypeError):
    """A value an operation refuses, with a message written for the spec's author already."""


def checked(value: Any) -> Any:
    """`value`, unless it is a number or string beyond the limits."""
    if type(value) is int and not -_TOO_BIG < value < _TOO_BIG:
        raise NumberTooHigh(f"the result would have more than {MAX_DIGITS} digits")
    if isinstance(value, str) and len(value) > simpleeval.MAX_STRING_LENGTH:
        raise IterableTooLong(value)
    return value


def lookup(container: Any, key: Any) -> Any:
    """`container.key` or `container[key]`: a key of a dict or an item of a list, else null."""
    if container is None:
        return None
    if isinstance(container, dict) and isinstance(key, (str, int, float)):
        return container.get(key)
    if is_list(container) and type(key) is int:
        return container[key] if -len(container) <= key < len(container) else None
    what = f"item [{key}]" if type(key) is int else "null" if key is None else repr(key)
    error = NullUsed if key is None else TypeError
    raise error(f"cannot look up {what} in {kind(container)} (only objects have keys, "
                "only lists have items)")


def missing(where: str, container: Any, key: Any) -> str:
    """Why `where[key]` is null: the key or item it lacks, and what it has."""
    if isinstance(container, dict) and key not in container:
        return f"{where} has no key {key!r} ({known_keys(key, container)})"
    if is_list(container) and type(key) is int and not -len(container) <= key < len(container):
        return f"{where} has no item [{key}] (it has {len(container)})"
    return f"{where}{f'.{key}' if isinstance(key, str) and key.isidentifier() else f'[{key!r}]'} is null"


# -- functions ---------------------------------------------------------------------------------------

def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}() takes a string, not {kind(value)}")
    return value


def _lower(s: Any) -> str:
    return _string("lower", s).lower()


def _upper(s: Any) -> str:
    return _string("upper", s).upper()


def _strip(s: Any) -> str:
    return _string("strip", s).strip()


def _startswith(s: Any, prefix: Any) -> bool:
    return _string("startswith", s).startswith(_string("startswith", prefix))


def _endswith(s: Any, suffix: Any) -> bool:
    return _string("endswith", s).endswith(_string("endswith", suffix))


def _contains(container: Any, x: Any) -> bool:
    return x in container


def _round(x: Any, ndigits: Any = None) -> Any:
    # round(1, -10**6) computes 10**(10**6): keep the digits within the number limit
    if isinstance(ndigits, int) and abs(ndigits) > MAX_DIGITS:
        raise NumberTooHigh(f"round() to more than {MAX_DIGITS} digits is not allowed")
    return round(x, ndigits)


def _list(name: str, value: Any) -> Sequence[Any]:
    if not is_list(value):
        raise TypeError(f"{name}() takes a list, not {kind(value)}")
    return value


def _key(name: str, value: Any) -> str | int:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TypeError(f"{name}() takes a key (a string) after the list, not {kind(value)}")
    return value


class Picked(Sequence[Any]):
    """What `pluck` and `where` give: items of a list (those at `positions`, else all), or a key of
    each; read from the list when asked for, never copied."""

    def __init__(self, source: Sequence[Any], key: str | int | None = None,
                 positions: array | None = None):
        self.source, self.key, self.positions = source, key, positions
        #: how the list was written in the expression (`steps.m.output`), for messages
        self.text = "the list"

    def __len__(self) -> int:
        return len(self.source) if self.positions is None else len(self.positions)

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int):
            raise TypeError("items are looked up by position")
        item = self.source[index if self.positions is None else self.positions[index]]
        return item if self.key is None else lookup(item, self.key)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def why_null(self, index: int) -> str | None:
        """Why item `index` is null, when it is a key the item lacks."""
        if self.key is None:
            return None
        at = index if self.positions is None else self.positions[index]
        item = self.source[at]
        where = f"{self.text}[{at}]"
        if item is None:  # (from a `pluck` it pulled from: that one knows why)
            inner = self.source.why_null(at) if isinstance(self.source, Picked) else None
            return inner or f"{where} is null"
        return missing(where, item, self.key) if isinstance(item, dict) else None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, bytes)) or not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment] - as a list's

    def __repr__(self) -> str:
        return repr(list(self)) if len(self) <= 100 else f"Picked({len(self)} items of {self.text})"


def _any(items: Any) -> bool:
    return any(_list("any", items))


def _all(items: Any) -> bool:
    return all(_list("all", items))


def _count(items: Any) -> int:
    return sum(1 for item in _list("count", items) if item)


def _sum(items: Any) -> int | float:
    total: int | float = 0
    for i, item in enumerate(_list("sum", items)):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            message = f"sum() adds numbers; item [{i}] is {kind(item)}"
            if item is not None:
                raise TypeError(message)
            why = items.why_null(i) if isinstance(items, Picked) else None
            raise NullUsed(message, [why] if why else [])
        total = checked(total + item)
    return total


def _extreme(name: str, pick: Callable[..., Any]) -> Callable[..., Any]:
    """min or max, saying which item is null when one is (a key missing from an item)."""
    def extreme(*args: Any) -> Any:
        try:
            return pick(*args)
        except TypeError:
            items = args[0] if len(args) == 1 and is_list(args[0]) else args
            at = next((i for i, item in enumerate(items) if item is None), None)
            if at is None:
                raise
            why = items.why_null(at) if isinstance(items, Picked) else None
            raise NullUsed(f"{name}() compares numbers or strings; item [{at}] is null",
                           [why] if why else []) from None
    return extreme


def _pluck(items: Any, key: Any) -> Picked:
    return Picked(_list("pluck", items), _key("pluck", key))


_ANY = object()


def _where(items: Any, key: Any, value: Any = _ANY) -> Picked:
    source, key = _list("where", items), _key("where", key)
    positions = array("q")
    for i, item in enumerate(source):
        found = lookup(item, key)
        if (found == value) if value is not _ANY else found:
            positions.append(i)
    return Picked(source, positions=positions)


#: name -> (implementation, fewest arguments, most arguments or None for any number)
FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None]] = {
    "len": (len, 1, 1), "lower": (_lower, 1, 1), "upper": (_upper, 1, 1), "strip": (_strip, 1, 1),
    "startswith": (_startswith, 2, 2), "endswith": (_endswith, 2, 2), "contains": (_contains, 2, 2),
    "int": (int, 1, 1), "float": (float, 1, 1), "str": (str, 1, 1), "round": (_round, 1, 2),
    "abs": (abs, 1, 1), "min": (_extreme("min", min), 1, None),
    "max": (_extreme("max", max), 1, None), "bool": (bool, 1, 1),
    "any": (_any, 1, 1), "all": (_all, 1, 1), "count": (_count, 1, 1), "sum": (_sum, 1, 1),
    "pluck": (_pluck, 2, 2), "where": (_where, 2, 3),
}
