"""`unload_model`: unload a model to free its memory and context."""

from __future__ import annotations

from typing import Any

from ..errors import LmflowError
from . import register
from .base import MODEL_OPTION, ModelStep, StepContext, StepResult


@register
class UnloadModelStep(ModelStep):
    kind = "unload_model"
    summary = "Unload a model (the instance this run loaded, else every instance of its key)."
    cacheable = False
    changes_state = True
    options_schema = {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": {"model": MODEL_OPTION},
    }

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        backend, model = ctx.session.backend_for(options["model"])
        if not backend.manages_models:
            raise LmflowError(f"the {backend.kind} backend cannot unload models")
        backend.unload(model)
        ctx.session.model_unloaded(options["model"])
        return StepResult({"model": model.key, "unloaded": True})
