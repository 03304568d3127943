"""Model servers behind one seam: `Backend` (list, load, unload, chat, health), and their registry.

A backend is a `Backend` subclass registered under its `kind`, exactly like a step kind: the
built-in ones (local, lmstudio, openai) through the `lmflow.backends` entry point group in
lmflow's own package metadata, a third party's through the same group in theirs, or in-process
with `register_backend`. The spec's schema takes each backend's `server_options` (see
`lmflow.spec.schema`), and steps, validation and the CLI ask the class for its capabilities,
never for its name.
"""

from __future__ import annotations

import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Backend, ChatRequest, ChatResponse, ModelInfo

if TYPE_CHECKING:
    from ..spec.model import ServerConfig

__all__ = ["Backend", "ChatRequest", "ChatResponse", "ModelInfo", "backend_class", "backend_classes",
           "create_backend", "register_backend"]

#: the backend of a server that names none
DEFAULT_BACKEND = "local"

_BACKENDS: dict[str, type[Backend]] = {}
_lock = threading.Lock()
_loaded_entry_points = False


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register a backend class under its `kind` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or not isinstance(
            getattr(cls, "kind", None), str):
        raise TypeError(f"{cls!r} is not a Backend subclass with a kind")
    with _lock:
        _BACKENDS[cls.kind] = cls
    _forget_schema()
    return cls


def _forget_schema() -> None:
    """A new backend changes the spec's schema (the backend enum, its options)."""
    from ..spec import validate

    validate._validator.cache_clear()


def _load_entry_points() -> None:
    global _loaded_entry_points
    with _lock:
        if _loaded_entry_points:
            return
        _loaded_entry_points = True
        for ep in entry_points(group="lmflow.backends"):
            if ep.name in _BACKENDS:
                continue
            try:
                cls = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin is named, never a traceback
                from ..errors import LmflowError

                _loaded_entry_points = False
                raise LmflowError(f"the backend plugin '{ep.name}' ({ep.value}) cannot be loaded: "
                                  f"{type(exc).__name__}: {exc}; fix or uninstall the package that "
                                  "provides it") from exc
            _BACKENDS[getattr(cls, "kind", ep.name)] = cls


def backend_classes() -> dict[str, type[Backend]]:
    """Every registered backend class, by kind (built-in ones and plugins)."""
    _load_entry_points()
    with _lock:
        return dict(sorted(_BACKENDS.items()))


def backend_class(kind: str) -> type[Backend]:
    """The class registered as `kind`; a clear error naming the registered ones otherwise."""
    classes = backend_classes()
    if kind not in classes:
        from ..errors import LmflowError

        if not classes:
            raise LmflowError("no backends are registered: lmflow's package metadata is missing or "
                              "older than its code; reinstall lmflow (`pip install -e .` in a checkout)")
        raise LmflowError(f"unknown backend {kind!r}: registered backends are {', '.join(classes)} "
                          "(a plugin registers one in the entry point group lmflow.backends)")
    return classes[kind]


def create_backend(config: ServerConfig, spec_dir: Path | None = None) -> Backend:
    """The backend for a server config."""
    return backend_class(config.backend).create(config, spec_dir)
