"""What a loop holds beyond its options, as the validator parses it (`LoopStep.check_nested`):
its stop condition, its checkpoints (ordinary steps run at some generations) and how their
advice changes the state."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ...spec.model import StepSpec
from ..base import FUNCTION_PATTERN, Nest


@dataclass(frozen=True)
class ApplyField:
    """One state field a coach's advice may set: where in the advice, and within which bounds."""

    target: str  # dotted path in the state
    source: str  # dotted path in the advice
    minimum: float | None = None
    maximum: float | None = None
    #: allowed values; a mapping accepts its names or its values and sets the value
    enum: tuple[Any, ...] | dict[str, Any] | None = None
    bounds: str = "clamp"  # clamp | reject: what a value outside min..max does


@dataclass(frozen=True)
class Checkpoint:
    """Ordinary steps a loop runs at some generations, and how their advice changes the state."""

    index: int
    at: tuple[int, ...] = ()
    every: int | None = None  # first at `every`, then every `every` generations
    history: int = 5  # generations of stats the steps see as loop.history
    mode: str = "blocking"  # blocking | background
    steps: tuple[StepSpec, ...] = ()  # in the order written
    #: `module:function(state, advice) -> state`, or the fields set from the advice
    apply: str | tuple[ApplyField, ...] | None = None

    def due(self, generation: int) -> bool:
        return generation in self.at or bool(self.every and generation % self.every == 0)


@dataclass(frozen=True)
class LoopSpec:
    """The control of a `loop` step beyond its options: when it stops early, what it asks when."""

    until: Any = None  # a parsed expression over params, steps and loop
    checkpoints: tuple[Checkpoint, ...] = ()


def check_loop(options: dict[str, Any], nest: Nest) -> LoopSpec:
    """A loop step's `until` and checkpoints; what their steps refer to becomes the loop's dependencies."""
    checkpoints = []
    for c, cp in enumerate(options.get("checkpoints") or []):
        if not isinstance(cp, dict):
            continue
        at = cp.get("at", [])
        steps = nest.steps(("checkpoints", c, "steps"), cp.get("steps"))
        checkpoints.append(Checkpoint(
            index=c, at=tuple([at] if isinstance(at, int) else at if isinstance(at, list) else []),
            every=cp.get("every") if isinstance(cp.get("every"), int) else None,
            history=cp.get("history") or options.get("history") or 5,
            mode=cp.get("mode", "blocking"), steps=steps,
            apply=_apply(("checkpoints", c, "apply"), cp.get("apply"), nest)))
    return LoopSpec(until=nest.condition(("until",), options.get("until")), checkpoints=tuple(checkpoints))


def _apply(path: tuple, raw: Any, nest: Nest) -> str | tuple[ApplyField, ...] | None:
    """A checkpoint's `apply`: a function (it must import) or the fields it sets."""
    if isinstance(raw, str):
        from ..python import function_problem

        problem = function_problem(raw, nest.spec_dir) if re.fullmatch(FUNCTION_PATTERN, raw) else None
        if problem:
            nest.problem(path, *problem)
        return raw
    if not isinstance(raw, dict):
        return None
    fields = []
    for target, rule in raw.items():
        rule = rule if isinstance(rule, dict) else {}
        low, high = rule.get("min"), rule.get("max")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            nest.problem(path + (target, "min"), f"min {low} is above max {high}")
        enum = rule.get("enum")
        fields.append(ApplyField(
            target=str(target), source=str(rule.get("from", target)),
            minimum=low if isinstance(low, (int, float)) else None,
            maximum=high if isinstance(high, (int, float)) else None,
            enum=tuple(enum) if isinstance(enum, list) else dict(enum) if isinstance(enum, dict) else None,
            bounds=rule.get("bounds", "clamp")))
    return tuple(fields)
