"""`ensure_server`: make sure a model server answers; start it with `server.start` when it is down."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import Problem
from ..spec.hints import suggest
from . import register
from .base import CheckContext, Step, StepContext, StepResult


@register
class EnsureServerStep(Step):
    kind = "ensure_server"
    summary = "Check a server's health and start it when it is down (server.start)."
    cacheable = False
    changes_state = True
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"server": {"type": "string", "description": "A server name (default: 'default')."}},
    }

    def check(self, options: dict[str, Any], ctx: CheckContext) -> Iterator[Problem]:
        name = options.get("server", "default")
        if name not in ctx.server_names:
            yield ctx.problem(("server",), f"unknown server '{name}'", suggest(name, ctx.server_names))

    def servers(self, options: dict[str, Any]) -> list[str]:
        return [options.get("server", "default")]

    def output_schema(self, options: dict[str, Any], spec_dir: Any) -> dict[str, Any]:
        return {"type": "object", "properties": {k: {} for k in ("url", "was_running", "started", "seconds")}}

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        return StepResult(ctx.session.server_backend(options.get("server", "default")).ensure())
