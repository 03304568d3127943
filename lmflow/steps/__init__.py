"""Step kinds and their registry (`lmflow.plugins.Registry`, the one backends use too)."""

from __future__ import annotations

from ..plugins import Registry
from .base import CheckContext, FixedModels, Session, Step, StepContext, StepResult

__all__ = ["CheckContext", "FixedModels", "Session", "Step", "StepContext", "StepResult", "get_kind",
           "kinds", "register"]

#: built-in kinds register through the entry point group, exactly as a third party's
_REGISTRY: Registry[Step] = Registry("step kind", "lmflow.steps", Step, make=lambda cls: cls())


def register(cls: type[Step]) -> type[Step]:
    """Register a step kind (usable as a class decorator); the next spec loaded can use it."""
    return _REGISTRY.register(cls)


def kinds() -> dict[str, Step]:
    """All registered kinds, by name."""
    return _REGISTRY.all()


def get_kind(name: str) -> Step:
    return kinds()[name]
