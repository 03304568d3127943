"""`probe_context`: measure a model's loadable and working context, and record it for `probed`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from . import register
from .base import MODEL_OPTION, ModelStep, StepContext, StepResult


@register
class ProbeContextStep(ModelStep):
    kind = "probe_context"
    summary = "Measure the largest context a model loads at and the largest at which it still works."
    cacheable = False  # the registry is the cache: a finished probe replays without loading
    changes_state = True
    options_schema = {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": {
            "model": MODEL_OPTION,
            "min": {"type": "integer", "minimum": 128},
            "max": {"type": "integer", "minimum": 128, "description": "Default: the declared maximum."},
            "granularity": {"type": "integer", "minimum": 16},
            "load_only": {"type": "boolean", "description": "Skip the working maximum."},
            "fresh": {"type": "boolean", "description": "Forget earlier attempts of this probe."},
        },
    }

    def output_schema(self, options: dict[str, Any], spec_dir: Any) -> dict[str, Any]:
        return {"type": "object", "properties": {k: {} for k in (
            "model", "declared_max", "loadable_max", "working_max", "loads", "chart")}}

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        from .. import probe
        from ..render.probe import loadable_text, report_markdown, working_text

        backend, model = ctx.session.raw_model(options["model"])
        report = probe.measure(
            backend, model, minimum=options.get("min", 1024), maximum=options.get("max"),
            granularity=options.get("granularity", 1024), fresh=options.get("fresh", False),
            load_only=options.get("load_only", False),
            on_attempt=lambda a: ctx.emit("probe_attempt", asdict(a)))
        if report.loadable_max is None:  # on the run's stderr too, with why the smallest size failed
            why = report.attempts[0].detail if report.attempts else ""
            ctx.emit("warning", {"message": f"{model.key}: {loadable_text(report)}"
                                            + (f": {why}" if why else "")})
        elif not options.get("load_only") and report.working_max is None:  # not only in the artifact
            ctx.emit("warning", {"message": f"{model.key}: {working_text(report)}"})
        ctx.session.model_probed(options["model"])
        output = {"model": model.key, "declared_max": report.declared_max,
                  "loadable_max": report.loadable_max, "working_max": report.working_max,
                  "loads": report.loads, "chart": str(probe.save_chart(report) or "") or None}
        return StepResult(output, artifact=report_markdown(report))
