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
from ..spec.model import Link, parse_duration
from . import register
from .base import (
    FALLBACK_OPTION,
    FUNCTION_PATTERN,
    MODEL_OPTION,
    CheckContext,
    ModelStep,
    StepContext,
    StepResult,
)

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
            "fallback": {**FALLBACK_OPTION, "description": "Instead of the model's own fallback: "
                         + FALLBACK_OPTION["description"]},
            "response_cache": {
                "description": "false: never cache this step's answers; true or {ttl, key}: cache them "
                               "(key: module:function called with the request; inputs with the same "
                               "key share an answer).",
                "oneOf": [{"type": "boolean"}, {
                    "type": "object", "additionalProperties": False,
                    "properties": {"ttl": {"oneOf": [{"type": "number", "minimum": 0}, {
                        "type": "string", "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*(ms|s|m|h|d)\\s*$"}]},
                                   "key": {"type": "string", "pattern": f"^{FUNCTION_PATTERN}$"}}}],
            },
        },
    }
    retries_inside = True

    def check(self, options: dict[str, Any], ctx: CheckContext) -> Iterator[Problem]:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        yield from super().check(options, ctx)
        yield from self._check_chain(options, ctx)
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

    def _check_chain(self, options: dict[str, Any], ctx: CheckContext) -> Iterator[Problem]:
        from ..spec.validate import link_problem, parse_fallback

        aliases = dict.fromkeys(ctx.model_aliases)
        for i, link in enumerate(parse_fallback(options.get("fallback"))):
            problem = link_problem(link, aliases, ctx.spec_dir)  # type: ignore[arg-type]
            if problem:
                yield ctx.problem(("fallback", i), *problem)
        setting = options.get("response_cache")
        if isinstance(setting, dict) and isinstance(setting.get("key"), str):
            from .python import missing_module

            missing = missing_module(setting["key"], ctx.spec_dir)
            if missing:
                yield ctx.problem(("response_cache", "key"), missing, "put it next to the spec or install it")

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

    def links(self, options: dict[str, Any], models: dict[str, Any]) -> list[Link]:
        """The fallback chain: the model, then the step's fallback, else the model's own."""
        from ..spec.validate import parse_fallback

        model = models.get(options["model"])
        fallback = parse_fallback(options["fallback"]) if "fallback" in options else (
            model.fallback if model is not None else ())
        return [Link("model", options["model"]), *fallback]

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        from ..backends.base import ChatRequest
        from ..resilience import Answer, Resilience
        from ..spec.model import Breaker
        from .python import call_function

        schema = options.get("response_schema")
        messages = self.messages(options, ctx.spec_dir)
        sampling = {k: options.get(k) for k in SAMPLING}
        policy = ctx.policy
        resilience = ctx.session.resilience or Resilience(Breaker(), None, None)

        def ask(alias: str, timeout: float) -> Answer:
            backend, model = ctx.session.backend_for(alias)
            response = backend.chat(ChatRequest(model=model, messages=messages, sampling=sampling,
                                                response_schema=schema, timeout=timeout))
            meta = {"model": response.model, "finish_reason": response.finish_reason,
                    "prompt_tokens": response.prompt_tokens,
                    "completion_tokens": response.completion_tokens,
                    "seconds": round(response.seconds, 3)}
            return Answer(self.parse(response, schema, options), meta)

        def request(errors: list[dict[str, Any]]) -> dict[str, Any]:
            return {"step": ctx.step_id, "messages": messages, "options": options, "errors": errors}

        def compute(link: Link, errors: list[dict[str, Any]]) -> Any:
            value = (link.target if link.kind == "value"
                     else call_function(link.target, {"request": request(errors)}, ctx.spec_dir,
                                     timeout=policy.timeout, cancel=ctx.stopping))
            if schema is not None:
                self.check_answer(value, schema, f"the {link.describe()} fallback's answer")
            return value

        setting = options.get("response_cache")
        config = ctx.session.response_cache
        cached = setting is not False and (config is not None or bool(setting))
        ttl = config.ttl if config is not None else None
        key_function = None
        if isinstance(setting, dict):
            ttl = parse_duration(setting["ttl"]) if "ttl" in setting else ttl
            key_function = setting.get("key")

        def cache_key(alias: str) -> str | None:
            from ..cache import response_key

            if not cached:
                return None
            # "similar enough" inputs share an answer: the user's key replaces the messages
            asked = (call_function(key_function, {"request": request([])}, ctx.spec_dir,
                                   timeout=policy.timeout, cancel=ctx.stopping)
                     if key_function else messages)
            return response_key({"model": ctx.session.model_identity(alias), "messages": asked,
                                 "user_key": bool(key_function), "sampling": sampling, "schema": schema})

        links = self.links(options, ctx.session.models)
        models = dict(ctx.session.models)
        for link in links:  # a context built by hand (tests, embedding) may not list every model
            if link.kind == "model" and link.target not in models:
                models[link.target] = ctx.session.backend_for(link.target)[1]
        answer = resilience.run_chain(links, models, policy, ask=ask,
                                      compute=compute, cache_key=cache_key, cache_ttl=ttl)
        meta = dict(answer.meta)
        return StepResult(answer.value, meta, answered_by=meta.pop("answered_by", None),
                          errors=meta.pop("errors", []))

    def parse(self, response: Any, schema: dict[str, Any] | None, options: dict[str, Any]) -> Any:
        """The answer's text, or its JSON checked against the schema."""
        if schema is None:
            return response.text
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
        self.check_answer(value, schema, "the answer")
        return value

    @staticmethod
    def check_answer(value: Any, schema: dict[str, Any], what: str) -> None:
        from jsonschema import Draft202012Validator

        error = next(iter(Draft202012Validator(schema).iter_errors(value)), None)
        if error is not None:
            where = ".".join(map(str, error.absolute_path)) or "top level"
            raise InvalidResponse(f"{what} does not match response_schema at {where}: {error.message}")
