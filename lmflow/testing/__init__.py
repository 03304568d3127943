"""Test helpers for lmflow and for users' own CI: an LM Studio-compatible server with real inference
(`server`), and a scripted backend that answers without one (`fakes.ScriptedBackend`).

Each module (httpx, starlette, the backends) is imported on first use of one of its names, so the
pytest plugin (`lmflow.testing.pytest_plugin`, loaded by every pytest run in a project with lmflow
installed) costs nothing to runs that do not use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fakes import ScriptedBackend
    from .server import Behaviour, LMStudioTestServer, TestModel, load_behaviour, serve

#: each public name, and the module that holds it
_MODULES = {"Behaviour": "server", "LMStudioTestServer": "server", "TestModel": "server",
            "load_behaviour": "server", "serve": "server", "ScriptedBackend": "fakes"}

__all__ = ["Behaviour", "LMStudioTestServer", "ScriptedBackend", "TestModel", "load_behaviour", "serve"]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        from importlib import import_module

        return getattr(import_module(f".{_MODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
