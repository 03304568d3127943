"""Test helpers for lmflow and for users' own CI: an LM Studio-compatible server with real inference."""

from .server import Behaviour, LMStudioTestServer, TestModel, load_behaviour, serve

__all__ = ["Behaviour", "LMStudioTestServer", "TestModel", "load_behaviour", "serve"]
