"""Test helpers for lmflow and for users' own CI: an LM Studio-compatible server with real inference.

The server module (httpx, starlette, the backends) is imported on first use of one of its names,
so the pytest plugin (`lmflow.testing.pytest_plugin`, loaded by every pytest run in a project with
lmflow installed) costs nothing to runs that do not use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Behaviour, LMStudioTestServer, TestModel, load_behaviour, serve

__all__ = ["Behaviour", "LMStudioTestServer", "TestModel", "load_behaviour", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
