"""`unload_model`: unload a model to free its memory and context."""

from __future__ import annotations

from typing import Any

from ..errors import LmflowError
from . import register
from .base import MODEL_OPTION, ModelStep, StepContext, StepResult


@register
class UnloadModelStep(ModelStep):
    kind = "unload_model"
    summary = "Unload the instance of a model this run loaded (all: every instance of its key)."
    cacheable = False
    changes_state = True
    options_schema = {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": {
            "model": MODEL_OPTION,
            "all": {"type": "boolean", "default": False,
                    "description": "Unload every instance of the model's key on the server, other "
                                   "clients' too (default: only the instance this run loaded)."},
        },
    }

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        alias = options["model"]
        backend, model = ctx.session.backend_for(alias)
        if not backend.manages_models:
            raise LmflowError(f"the {backend.kind} backend cannot unload models")
        every = bool(options.get("all"))
        unloaded = backend.unload(model, every=every)
        ctx.session.model_unloaded(alias)
        if unloaded or every:
            return StepResult({"model": model.key, "unloaded": unloaded})
        message = (f"nothing unloaded: this run has no instance of '{model.key}' (models.{alias}) loaded; "
                   "an instance another client loaded is left alone (`all: true` unloads every "
                   "instance of the key)")
        ctx.emit("warning", {"message": message})
        return StepResult({"model": model.key, "unloaded": []}, {"warnings": [message]})
