"""What of a loop, beyond its options, changes its answer: its checkpoints and what they refer to.

A loop's cache key also names its resumable state (`$LMFLOW_HOME/loops/<key>.state`), so
the same spec with the same params resumes where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...spec import templates
from ...spec.model import StepSpec
from ..base import KeySource
from .spec import LoopSpec


def loop_material(step: StepSpec, run: KeySource) -> dict[str, Any]:
    """What its checkpoints ask, of which models, how advice is applied, and the outside values
    their templates refer to."""
    from .. import get_kind
    from ..python import source_hash

    assert step.nested is not None
    spec_dir = run.spec.dir
    checkpoints = []
    for c in step.nested.checkpoints:
        steps = [[s.id, s.kind, s.options, dataclasses.asdict(s.policy),
                  getattr(s.when, "text", s.when),
                  {a: run.model_identity(a) for a in get_kind(s.kind).models(s.options)},
                  get_kind(s.kind).cache_material(s.options, spec_dir)] for s in c.steps]
        apply = c.apply if isinstance(c.apply, str) or c.apply is None else [
            dataclasses.asdict(f) for f in c.apply]
        source = source_hash(c.apply, spec_dir) if isinstance(c.apply, str) else None
        checkpoints.append([c.at, c.every, c.history, c.mode, steps, apply, source])
    return {"until": getattr(step.nested.until, "text", None), "checkpoints": checkpoints,
            "refers_to": outside_values(step.nested, run)}


def outside_values(loop: LoopSpec, run: KeySource) -> dict[str, Any]:
    """The params and top-level step outputs that a loop's checkpoint steps and `until` refer to.

    Those are hashed unresolved (they also refer to `loop.*`, known only as the loop runs), so
    the values they take from outside the loop go into the key beside them: `-p tag=B` after
    `-p tag=A` is another loop, not A's answers served again.
    """
    refs: list[tuple[str, Any]] = []
    expressions = [loop.until, *(s.when for c in loop.checkpoints for s in c.steps)]
    for expression in expressions:
        for ref in getattr(expression, "references", ()):
            refs.append((ref.root, ref.path[0] if ref.path else None))
    for checkpoint in loop.checkpoints:
        for s in checkpoint.steps:
            for _, text in templates.iter_templates(s.options):
                try:
                    ref = templates.parse_ref(text)
                except templates.TemplateError:
                    continue  # validation refused it already; nothing to hash
                refs.append((ref.root, ref.parts[0] if ref.parts else None))
    spec = run.spec
    top_level = {s.id for s in spec.steps}
    params = sorted({str(name) for root, name in refs if root == "params"})
    steps = sorted({str(name) for root, name in refs if root == "steps" and name in top_level})
    return {"params": {name: spec.params.get(name) for name in params},
            "steps": {name: run.outputs.get(name) for name in steps}}
