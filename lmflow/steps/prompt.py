"""`prompt`: ask a model, optionally for JSON that matches a schema."""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidResponse, Problem
from . import register
from .base import MODEL_OPTION, CheckContext, ModelStep, StepContext, StepResult

_TEXT_OR_FILE = {
    "description": "Inline text, or {file: path} relative to the spec's folder; "
                   "both may use ${{ }} references.",
    "oneOf": [
        {"type": "string"},
        {"type": "object", "required": ["file"], "additionalProperties": False,
         "properties": {"file": {"type": "string"}}},
    ],
}
SAMPLING = ("temperature", "top_p", "max_tokens", "seed", "stop")


def _read_structured(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


@register
class PromptStep(ModelStep):
    kind = "prompt"
    summary = "Send messages to a model; with response_schema the answer is parsed, validated JSON."
    options_schema = {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": {
            "model": MODEL_OPTION,
            "system": _TEXT_OR_FILE,
            "user": _TEXT_OR_FILE,
            "messages": {
                "type": "array",
                "description": "Full message list, instead of system/user.",
                "items": {
                    "type": "object", "required": ["role", "content"], "additionalProperties": False,
                    "properties": {"role": {"enum": ["system", "user", "assistant"]},
                                   "content": {"type": "string"}},
                },
            },
            "images": {"type": "array", "items": {"type": "string"},
                       "description": "Image files sent with the user message (vision models)."},
            "response_schema": {
                "description": "JSON Schema of the answer, inline or a .json/.yaml file.",
                "oneOf": [{"type": "object"}, {"type": "string"}],
            },
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "max_tokens": {"type": "integer", "minimum": 1},
            "seed": {"type": "integer"},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        },
    }

    def check(self, options: dict[str, Any], ctx: CheckContext) -> Iterator[Problem]:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        yield from super().check(options, ctx)
        if "messages" in options and ("system" in options or "user" in options):
            yield ctx.problem(("messages",), "give either messages or system/user, not both", key=True)
        elif "messages" not in options and "user" not in options:
            yield ctx.problem((), "a prompt needs a user message", "add user: ... or messages: [...]")
        for name in ("system", "user"):
            value = options.get(name)
            if isinstance(value, dict) and isinstance(value.get("file"), str) and not (
                ctx.spec_dir / value["file"]
            ).is_file():
                yield ctx.problem((name, "file"), f"file not found: {value['file']}",
                                  "paths are relative to the spec's folder")
        images = options.get("images")
        for i, image in enumerate(images if isinstance(images, list) else []):
            if isinstance(image, str) and not (ctx.spec_dir / image).is_file():
                yield ctx.problem(("images", i), f"image not found: {image}",
                                  "paths are relative to the spec's folder")
        schema = options.get("response_schema")
        if isinstance(schema, str):
            path = ctx.spec_dir / schema
            if not path.is_file():
                yield ctx.problem(("response_schema",), f"file not found: {schema}",
                                  "paths are relative to the spec's folder")
                return
            try:
                schema = _read_structured(path)
            except (ValueError, yaml.YAMLError) as exc:
                yield ctx.problem(("response_schema",), f"{schema} is not valid JSON/YAML: {exc}")
                return
        if isinstance(schema, dict):
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                where = ".".join(map(str, exc.absolute_path)) or "top level"
                yield ctx.problem(("response_schema",), f"not a valid JSON Schema at {where}: {exc.message}")
        elif schema is not None:
            yield ctx.problem(("response_schema",), "a JSON Schema must be an object")

    def prepare(self, options: dict[str, Any], spec_dir: Path) -> dict[str, Any]:
        prepared = dict(options)
        for name in ("system", "user"):
            if isinstance(prepared.get(name), dict):
                prepared[name] = (spec_dir / prepared[name]["file"]).read_text(encoding="utf-8")
        if isinstance(prepared.get("response_schema"), str):
            prepared["response_schema"] = _read_structured(spec_dir / prepared["response_schema"])
        return prepared

    def output_schema(self, options: dict[str, Any], spec_dir: Path) -> dict[str, Any] | None:
        return options.get("response_schema") or {"type": "string"}

    def cache_material(self, options: dict[str, Any], spec_dir: Path) -> Any:
        return {image: hashlib.sha256((spec_dir / image).read_bytes()).hexdigest()
                for image in options.get("images") or []}

    def messages(self, options: dict[str, Any], spec_dir: Path) -> list[dict[str, Any]]:
        if "messages" in options:
            return [dict(m) for m in options["messages"]]
        messages: list[dict[str, Any]] = []
        if options.get("system"):
            messages.append({"role": "system", "content": options["system"]})
        user: Any = options["user"]
        if options.get("images"):
            user = [{"type": "text", "text": user}]
            for image in options["images"]:
                path = spec_dir / image
                mime = mimetypes.guess_type(path.name)[0] or "image/png"
                data = base64.b64encode(path.read_bytes()).decode()
                user.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
        messages.append({"role": "user", "content": user})
        return messages

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        from jsonschema import Draft202012Validator

        from ..backends.base import ChatRequest

        backend, model = ctx.backend_for(options["model"])
        schema = options.get("response_schema")
        request = ChatRequest(
            model=model, messages=self.messages(options, ctx.spec_dir),
            sampling={k: options.get(k) for k in SAMPLING}, response_schema=schema,
            timeout=ctx.timeout,
        )
        response = backend.chat(request)
        meta = {"model": response.model, "finish_reason": response.finish_reason,
                "prompt_tokens": response.prompt_tokens,
                "completion_tokens": response.completion_tokens,
                "seconds": round(response.seconds, 3)}
        if schema is None:
            return StepResult(response.text, meta)
        try:
            value = json.loads(response.text)
        except ValueError:
            if response.finish_reason == "length":
                raise InvalidResponse(
                    f"the answer was cut at max_tokens={options.get('max_tokens')} before its JSON "
                    f"was complete: raise max_tokens (got {response.text[:120]!r})") from None
            raise InvalidResponse(
                f"the answer is not valid JSON: {response.text[:200]!r}; does the server "
                "support response_format json_schema?") from None
        error = next(iter(Draft202012Validator(schema).iter_errors(value)), None)
        if error is not None:
            where = ".".join(map(str, error.absolute_path)) or "top level"
            raise InvalidResponse(f"the answer does not match response_schema at {where}: "
                                  f"{error.message}")
        return StepResult(value, meta)
