"""`load_model`: load a model at a context length, read back what the server gave, warm it up."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import (
    ContextMismatch,  # noqa: F401 - raised here, defined with the tree
    LmflowError,
)
from ..spec.model import parse_duration
from . import register
from .base import MODEL_OPTION, ModelStep, StepContext, StepResult


def load(options: dict[str, Any], ctx: StepContext) -> StepResult:
    """Shared by load_model and reload_model."""
    backend, model = ctx.session.backend_for(options["model"])
    overrides = {k: options[k] for k in ("context_length", "gpu", "ttl", "identifier") if k in options}
    if "ttl" in overrides:
        overrides["ttl"] = parse_duration(overrides["ttl"])
    if overrides:
        model = dataclasses.replace(model, **overrides)
    refused = sorted({"gpu", "ttl", "identifier"} & set(overrides) - backend.load_options)
    if refused:
        raise LmflowError(f"the {backend.kind} backend cannot apply the load option(s) "
                          f"{', '.join(refused)}: remove them from the step")
    if not backend.manages_models:
        raise LmflowError(f"the {backend.kind} backend cannot load models: use a backend that "
                          "manages models (lmstudio, local), or drop the load_model step")
    info = ctx.session.load(options["model"], model)
    asked, actual = model.context_length, info.loaded_context_length
    output = {"model": model.key, "instance": info.instance_id, "context_length": actual,
              "requested_context_length": asked, "load_seconds": info.load_seconds}
    meta: dict[str, Any] = {}
    if asked and actual != asked:
        message = (f"{backend.url or backend.kind} loaded '{model.key}' with context {actual}, "
                   f"not the {asked} asked for")
        if options.get("strict"):
            raise ContextMismatch(message + " (strict: true): ask for at most what it can load, "
                                  "or probe the model's real limit")
        meta["warnings"] = [message]
        ctx.emit("warning", {"message": message})
    if options.get("warmup"):
        from ..backends.base import ChatRequest

        response = backend.chat(ChatRequest(model=model, timeout=ctx.timeout, sampling={"max_tokens": 8},
                                            messages=[{"role": "user", "content": options["warmup"]}]))
        meta["warmup_seconds"] = round(response.seconds, 3)
    return StepResult(output, meta)


@register
class LoadModelStep(ModelStep):
    kind = "load_model"
    summary = "Load a model; the context length the server applied is read back and checked."
    cacheable = False
    changes_state = True
    options_schema = {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": {
            "model": MODEL_OPTION,
            "context_length": {"type": "integer", "minimum": 128,
                               "description": "Overrides the model's context_length for this load."},
            "gpu": {"description": "lmstudio: GPU offload for this load, max, off or a ratio 0..1.",
                    "oneOf": [{"enum": ["max", "off"]}, {"type": "number", "minimum": 0, "maximum": 1}]},
            "ttl": {"$ref": "#/$defs/duration",
                    "description": "lmstudio: unload after this long idle (30s, 10m, or seconds)."},
            "identifier": {"type": "string", "description": "lmstudio: the instance's identifier."},
            "strict": {"type": "boolean",
                       "description": "Fail when the server applies another context length (default: warn)."},
            "warmup": {"type": "string", "description": "A short prompt sent once after loading."},
        },
    }

    def output_schema(self, options: dict[str, Any], spec_dir: Any) -> dict[str, Any]:
        return {"type": "object", "properties": {k: {} for k in (
            "model", "instance", "context_length", "requested_context_length", "load_seconds")}}

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        return load(options, ctx)
