"""Step kinds and their registry."""

from __future__ import annotations

from importlib.metadata import entry_points

from .base import CheckContext, FixedModels, Session, Step, StepContext, StepResult

__all__ = ["CheckContext", "FixedModels", "Session", "Step", "StepContext", "StepResult", "get_kind",
           "kinds", "register"]

_KINDS: dict[str, Step] = {}
_loaded_entry_points = False


def register(cls: type[Step]) -> type[Step]:
    """Register a step kind (usable as a class decorator)."""
    _KINDS[cls.kind] = cls()
    return cls


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in entry_points(group="lmflow.steps"):
        if ep.name not in _KINDS:
            cls = ep.load()
            _KINDS[cls.kind] = cls()


def kinds() -> dict[str, Step]:
    """All registered kinds, by name."""
    _load_entry_points()
    return dict(sorted(_KINDS.items()))


def get_kind(name: str) -> Step:
    return kinds()[name]
