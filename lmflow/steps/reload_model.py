"""`reload_model`: unload and load again with the same settings, to start from an empty context."""

from __future__ import annotations

from typing import Any

from . import register
from .base import StepContext, StepResult
from .load_model import LoadModelStep, load


@register
class ReloadModelStep(LoadModelStep):
    kind = "reload_model"
    summary = "Unload then load a model with the same settings (frees its context)."

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        backend, model = ctx.session.backend_for(options["model"])
        if backend.manages_models:
            backend.unload(model)  # only the instance this run loaded, never another client's
            ctx.session.model_unloaded(options["model"])
        return load(options, ctx)
