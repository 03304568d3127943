"""Model servers behind one seam: `Backend` (list, load, unload, chat, health), and their registry.

A backend is a `Backend` subclass registered under its `kind`, exactly like a step kind: the
built-in ones (local, lmstudio, openai) through the `lmflow.backends` entry point group in
lmflow's own package metadata, a third party's through the same group in theirs, or in-process
with `register_backend`. The spec's schema takes each backend's `server_options` (see
`lmflow.spec.schema`), and steps, validation and the CLI ask the class for its capabilities,
never for its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..plugins import Registry
from .base import Backend, ChatRequest, ChatResponse, ModelInfo

if TYPE_CHECKING:
    from ..spec.model import ServerConfig

__all__ = ["Backend", "ChatRequest", "ChatResponse", "ModelInfo", "backend_class", "backend_classes",
           "create_backend", "register_backend"]

#: the backend of a server that names none
DEFAULT_BACKEND = "local"

_REGISTRY: Registry[type[Backend]] = Registry("backend", "lmflow.backends", Backend)


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register a backend class under its `kind` (usable as a class decorator); the next spec
    loaded can use it (the schema is rebuilt: `lmflow.plugins.by_version`)."""
    return _REGISTRY.register(cls)


def backend_classes() -> dict[str, type[Backend]]:
    """Every registered backend class, by kind (built-in ones and plugins)."""
    return _REGISTRY.all()


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
