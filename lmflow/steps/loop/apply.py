"""Applying a coach's advice to the loop's state: pure functions, tested on their own.

Each field the checkpoint's `apply` names is read from the advice, coerced to the type the
state holds (numbers read from text, rounded for whole fields), kept within min/max (clamped
or rejected) or matched against an enum (case, '-', '_' and spaces ignored), then set; one
change record per field says what happened.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .spec import ApplyField

_NORMAL = re.compile(r"[\s_\-]+")


def _normal(value: Any) -> str:
    return _NORMAL.sub("", str(value)).casefold()


def apply_fields(state: Any, advice: Any, fields: tuple[ApplyField, ...]) -> list[dict[str, Any]]:
    """Set state fields from the advice; one change record per field (what was clamped or rejected)."""
    changes = []
    for spec in fields:
        raw = _get(advice, spec.source)
        change: dict[str, Any] = {"field": spec.target, "raw": raw}
        current = _get(state, spec.target)
        if raw is None:
            change.update(status="absent", note=f"the advice has no {spec.source}")
        else:
            value, status, note = _coerce(spec, raw, current)
            if status == "applied" and value == current and type(value) is type(current):
                status = "unchanged"
            if status != "rejected" and not _set(state, spec.target, value):
                value, status, note = None, "rejected", f"the state has no {spec.target.rpartition('.')[0]}"
            change.update(status=status, note=note)
            if status != "rejected":
                change.update(previous=current, value=value)
        changes.append({k: v for k, v in change.items() if v is not None or k in ("raw", "value")})
    return changes


def _coerce(spec: ApplyField, raw: Any, current: Any) -> tuple[Any, str, str | None]:
    """(value, status, note): status is applied, clamped, normalised or rejected."""
    if spec.enum is not None:
        choices = spec.enum.items() if isinstance(spec.enum, dict) else [(v, v) for v in spec.enum]
        for name, value in choices:
            if raw == value and type(raw) is type(value):
                return value, "applied", None
            if _normal(raw) in (_normal(name), _normal(value)):
                return value, "normalised", f"{raw!r} read as {value!r}"
        allowed = ", ".join(map(str, spec.enum))
        return None, "rejected", f"{raw!r} is not one of: {allowed}"
    numeric = spec.minimum is not None or spec.maximum is not None or (
        isinstance(current, (int, float)) and not isinstance(current, bool))
    if isinstance(current, bool):
        if isinstance(raw, bool):
            return raw, "applied", None
        return None, "rejected", f"{raw!r} is not true/false"
    if not numeric:
        if current is not None and not isinstance(raw, type(current)):
            return None, "rejected", f"{raw!r} is not a {type(current).__name__}"
        return raw, "applied", None
    status, note = "applied", None
    value = raw
    if isinstance(value, str):
        try:
            value = float(value.strip())
            status, note = "normalised", f"{raw!r} read as a number"
        except ValueError:
            return None, "rejected", f"{raw!r} is not a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, "rejected", f"{raw!r} is not a number"
    whole = isinstance(current, int) and not isinstance(current, bool)
    if whole and value != int(value):
        rounded = math.floor(value + 0.5)
        value, status, note = rounded, "normalised", f"{raw!r} rounded to {rounded}"
    low = math.ceil(spec.minimum) if whole and spec.minimum is not None else spec.minimum
    high = math.floor(spec.maximum) if whole and spec.maximum is not None else spec.maximum
    for bound, outside, word in ((low, lambda v, b: v < b, "below min"),
                                 (high, lambda v, b: v > b, "above max")):
        if bound is not None and outside(value, bound):
            if spec.bounds == "reject":
                return None, "rejected", f"{raw!r} is {word} {bound}"
            value, status, note = bound, "clamped", f"{raw!r} is {word} {bound}: clamped"
    value = int(value) if whole else float(value) if isinstance(current, float) else value
    return value, status, note


def _get(container: Any, path: str) -> Any:
    current = container
    for part in path.split("."):
        if isinstance(current, dict):
            if part not in current:
                return None
            current = current[part]
        elif hasattr(current, part):
            current = getattr(current, part)
        else:
            return None
    return current


def _set(container: Any, path: str, value: Any) -> bool:
    """Set a dotted path; False when a parent on the way does not exist."""
    *parents, last = path.split(".")
    for part in parents:
        container = _get(container, part)
        if container is None:
            return False
    if isinstance(container, dict):
        container[last] = value
    else:
        setattr(container, last, value)
    return True
