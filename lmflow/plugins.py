"""One registry class for every extension point: step kinds and backends.

A `Registry` holds what is registered under a name, in-process (`register`) or through an
entry point group of installed packages (the built-in kinds and backends register exactly as a
third party's do). Both registries share one lock and one `version()`, bumped on every change:
whatever is built from what is registered (the spec's JSON Schema, its validators) is cached by
that version, so a kind or backend registered after a spec was loaded is seen by the next one.
A plugin that cannot be loaded is an LmflowError that names it and says what to do.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from .errors import LmflowError

T = TypeVar("T")

_lock = threading.RLock()
_version = 0


def version() -> int:
    """Changes whenever anything is registered in any registry."""
    return _version


def _bump() -> None:
    global _version
    with _lock:
        _version += 1


def by_version(fn: Callable[..., T]) -> Callable[..., T]:
    """Cache `fn`'s results (by its arguments) until anything is registered anywhere: for what is
    built from the registries, such as the spec's schema and its validators."""
    cache: dict[tuple[int, tuple[Any, ...]], T] = {}

    @functools.wraps(fn)
    def cached(*args: Any) -> T:
        hit = cache.get((_version, args))
        if hit is not None:
            return hit
        value = fn(*args)  # may load entry points: stored under the version after it
        with _lock:
            for stale in [k for k in cache if k[0] != _version]:
                del cache[stale]
            cache[(_version, args)] = value
        return value

    return cached


class Registry(Generic[T]):
    """Named plugins of one kind: `what` in messages, loaded from entry point `group`."""

    def __init__(self, what: str, group: str, base: type, make: Callable[[Any], T] = lambda cls: cls):
        self.what, self.group, self.base = what, group, base
        self._make = make
        self._items: dict[str, T] = {}
        self._loaded = False

    def _name_of(self, cls: Any) -> str:
        if not (isinstance(cls, type) and issubclass(cls, self.base)
                and isinstance(getattr(cls, "kind", None), str)):
            raise TypeError(f"{cls!r} is not a {self.base.__name__} subclass with a kind")
        return cls.kind

    def register(self, obj: Any) -> Any:
        """Register the class `obj` under its `kind` (usable as a class decorator); returns `obj`."""
        item = self._make(obj)
        with _lock:
            self._items[self._name_of(obj)] = item
            _bump()
        return obj

    def unregister(self, name: str) -> None:
        """Forget what is registered as `name` (a test's own plugin, at its end)."""
        with _lock:
            self._items.pop(name, None)
            _bump()

    def all(self) -> dict[str, T]:
        """Everything registered, by name (entry points loaded on first use)."""
        self._load_entry_points()
        with _lock:
            return dict(sorted(self._items.items()))

    def get(self, name: str) -> T:
        return self.all()[name]

    def _load_entry_points(self) -> None:
        with _lock:
            if self._loaded:
                return
            self._loaded = True
            for ep in entry_points(group=self.group):
                if ep.name in self._items:
                    continue
                try:
                    obj = ep.load()
                    self._items[self._name_of(obj)] = self._make(obj)
                except Exception as exc:  # noqa: BLE001 - a broken plugin is named, never a traceback
                    self._loaded = False
                    raise LmflowError(
                        f"the {self.what} plugin '{ep.name}' ({ep.value}) cannot be loaded: "
                        f"{type(exc).__name__}: {exc}; fix or uninstall the package that provides it "
                        f"(entry point group {self.group})") from exc
            _bump()
