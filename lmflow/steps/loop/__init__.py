"""`loop`: the user's optimiser, one generation at a time, with checkpoints that ask a coach.

The options here are what is resolved once when the loop starts (how many generations,
the init and body functions). `until` and the checkpoints are parsed by `check_nested`
(`spec`: the validator checks their steps like the spec's own) into `StepSpec.nested`. The
package holds the rest: `runner` (generations, checkpoints, resume), `apply` (advice into
the state), `key` (what changes its answer), `report` (its chart in the UI). A
checkpoint's steps run through the Step contract's `units`: each one a unit like any
other, a task run of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import Problem
from ...spec import templates
from ...spec.model import StepSpec
from .. import register
from ..base import FUNCTION_PATTERN, CheckContext, Holds, KeySource, Nest, Step, StepContext, StepResult
from .spec import LoopSpec, check_loop

_FUNCTION = {"type": "string", "pattern": f"^{FUNCTION_PATTERN}$", "description": "module:function"}
_COUNT = {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": r"^\s*\$\{\{"}],
          "description": "A positive integer, or a reference such as ${{ params.generations }}."}

#: what `loop.` offers in a checkpoint's steps and in `until`
LOOP_FIELDS = ("generation", "generations", "state", "stats", "history", "previous", "asked_at")

APPLY_FIELD = {
    "type": "object",
    "additionalProperties": False,
    "description": "How one field of the advice sets the state field named by the key.",
    "properties": {
        "from": {"type": "string", "minLength": 1,
                 "description": "Dotted path in the advice (default: the key)."},
        "min": {"type": "number"},
        "max": {"type": "number"},
        "enum": {"description": "Allowed values: a list, or a mapping of names to values (the coach "
                                "may answer either; case, '-', '_' and spaces are ignored).",
                 "oneOf": [{"type": "array", "minItems": 1}, {"type": "object", "minProperties": 1}]},
        "bounds": {"enum": ["clamp", "reject"],
                   "description": "A value outside min..max is clamped (default) or rejected."},
    },
}

CHECKPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["steps"],
    "properties": {
        "at": {"description": "Generations to run at (a number or a list).",
               "oneOf": [{"type": "integer", "minimum": 1},
                         {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1}]},
        "every": {"type": "integer", "minimum": 1,
                  "description": "Run every N generations, the first time at generation N."},
        "history": {"type": "integer", "minimum": 1,
                    "description": "Generations of stats the steps see as loop.history "
                                   "(default: the loop's)."},
        "mode": {"enum": ["blocking", "background"],
                 "description": "blocking: the loop waits for the advice; background: it goes on and the "
                                "advice is applied at the first generation after it arrives."},
        "steps": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/step"},
                  "description": "Ordinary steps, run in the order written; the last one's output is "
                                 "the advice."},
        "apply": {"description": "module:function(state, advice) -> state, or state fields set from the "
                                 "advice: {field: {from, min, max, enum, bounds}}.",
                  "oneOf": [_FUNCTION, {"type": "object", "minProperties": 1,
                                        "additionalProperties": {"oneOf": [APPLY_FIELD, {"type": "null"}]}}]},
    },
}


@register
class LoopStep(Step):
    kind = "loop"
    summary = ("Run module:function once per generation; checkpoints ask a coach at generation N and "
               "every K after and apply its advice. Resumes after a crash.")
    options_schema = {
        "type": "object",
        "required": ["init", "body"],
        "additionalProperties": False,
        "properties": {
            "generations": _COUNT,
            "until": {"type": "string", "description": "Stop when this condition holds after a generation "
                                                      "(e.g. loop.stats.best < 0.01)."},
            "max_seconds": {"$ref": "#/$defs/duration",
                            "description": "Stop after this long (e.g. 2h); a resumed run counts on."},
            "init": {"description": "module:function that returns the first state, or {function, args}.",
                     "oneOf": [_FUNCTION, {"type": "object", "required": ["function"],
                                           "additionalProperties": False,
                                           "properties": {"function": _FUNCTION,
                                                          "args": {"type": "object"}}}]},
            "body": {**_FUNCTION,
                     "description": "module:function(state, generation) -> stats: one generation."},
            "history": {"type": "integer", "minimum": 1,
                        "description": "Generations of stats a checkpoint sees (default 5)."},
            "chart": {"type": "array", "items": {"type": "string"},
                      "description": "Stats fields to chart (default: the numeric ones, at most 4)."},
            "checkpoints": {"type": "array", "items": CHECKPOINT},
        },
    }

    holds = Holds(
        root="loop", fields=LOOP_FIELDS, group="checkpoint", options=("checkpoints", "until"),
        defined_in="a loop's checkpoint and until",
        sees_holder="a checkpoint sees its loop as loop.state, loop.stats, loop.history and loop.generation",
        from_outside="refer to the loop's output instead, e.g. steps.{holder}.output.analyses",
        not_nested="put the inner loop's work in its body function")

    def check(self, options: dict[str, Any], ctx: CheckContext) -> Iterator[Problem]:
        from ..python import function_problem

        if not any(k in options for k in ("generations", "until", "max_seconds")):
            yield ctx.problem((), "a loop needs generations, until or max_seconds (else it never ends)",
                              "e.g. generations: 200")
        for key in ("init", "body"):
            ref = options.get(key)
            ref = ref.get("function") if isinstance(ref, dict) else ref
            if isinstance(ref, str) and re.fullmatch(FUNCTION_PATTERN, ref):
                problem = function_problem(ref, ctx.spec_dir)
                if problem:
                    yield ctx.problem((key,) + (("function",) if isinstance(options[key], dict) else ()),
                                      *problem)
        for i, checkpoint in enumerate(options.get("checkpoints") or []):
            if isinstance(checkpoint, dict) and "at" not in checkpoint and "every" not in checkpoint:
                yield ctx.problem(("checkpoints", i), "a checkpoint needs at: or every:",
                                  "e.g. every: 5, which runs at 5, 10, 15...")

    def check_nested(self, options: dict[str, Any], nest: Nest) -> LoopSpec:
        """Its `until` and checkpoints (lmflow.steps.loop.spec)."""
        return check_loop(options, nest)

    def cache_material(self, options: dict[str, Any], spec_dir: Path) -> Any:
        """The source of the modules the loop calls: a changed optimiser is a changed loop."""
        from ..python import source_hash

        refs = [options.get("body"), options.get("init")]
        refs = [r.get("function") if isinstance(r, dict) else r for r in refs]
        return {ref: source_hash(ref, spec_dir) for ref in refs if isinstance(ref, str)}

    def nested_material(self, step: StepSpec, run: KeySource) -> dict[str, Any] | None:
        """What its checkpoints ask and of which models (lmflow.steps.loop.key)."""
        from .key import loop_material

        return {"loop": loop_material(step, run)}

    def plan_lines(self, step: StepSpec, params: dict[str, Any]) -> list[str]:
        """How the loop stops, and what each checkpoint runs when and applies."""
        options, loop = step.options, step.nested
        assert loop is not None
        try:  # `generations: ${{ params.n }}` shows its value
            generations = templates.render(options.get("generations"), {"params": params})
        except templates.TemplateError:
            generations = options.get("generations")
        stops = [f"{generations} generations" if generations is not None else "",
                 f"until {loop.until.text}" if loop.until is not None else "",
                 f"at most {options['max_seconds']}" if "max_seconds" in options else ""]
        init = options["init"] if isinstance(options["init"], str) else options["init"]["function"]
        stop = ", or ".join(x for x in stops if x)
        lines = [f"     body {options['body']}, init {init}; stops after {stop}"]
        for c in loop.checkpoints:
            when = ", ".join(filter(None, [f"at {', '.join(map(str, c.at))}" if c.at else "",
                                           f"every {c.every} (first at {c.every})" if c.every else ""]))
            apply = c.apply if isinstance(c.apply, str) else (
                "sets " + ", ".join(f.target for f in c.apply) if c.apply else "records only")
            lines.append(f"     checkpoint {when}, {c.mode}, history {c.history}: "
                         + " -> ".join(f"{s.id} [{s.kind}]" for s in c.steps) + f"; {apply}")
        return lines

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        from ...errors import LmflowError
        from .runner import LoopRunner

        if ctx.units is None or ctx.step is None or ctx.step.nested is None:
            raise LmflowError("a loop runs inside a spec (lmflow run): its checkpoints are steps of the spec")
        return LoopRunner(ctx.step, options, ctx).run()
