"""`prompt`: ask a model, optionally for JSON that matches a schema."""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidResponse, LmflowError, Problem, RunStopping
from ..spec.model import Link, StepSpec, parse_duration
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
#: a bound on max_tokens above any model's context (a larger value is a typo, which a server
#: may even read as a negative number)
MAX_TOKENS = 2**20


def _templated(path: str) -> bool:
    return "${{" in path


def _read_bytes(spec_dir: Path, name: str) -> bytes:
    """A file a step names, relative to the spec's folder; a clear error when it is not there."""
    try:
        return (spec_dir / name).read_bytes()
    except OSError as exc:
        raise LmflowError(f"cannot read {name} ({spec_dir / name}): {exc.strerror or exc}; paths are "
                          "relative to the spec's folder") from None


def _read(spec_dir: Path, name: str, what: str) -> str:
    data = _read_bytes(spec_dir, name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LmflowError(f"the {what} file {name} is not UTF-8 text (byte {exc.start}): save it as "
                          "UTF-8") from None


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
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS,
                           "description": f"Most tokens in the answer: at most {MAX_TOKENS} (2^20, more "
                                          "than any model's context), and at most the model's "
                                          "context_length."},
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
                    "properties": {"ttl": {"$ref": "#/$defs/duration"},
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
        limit = ctx.context_lengths.get(options.get("model"))  # type: ignore[arg-type]
        max_tokens = options.get("max_tokens")
        if limit and isinstance(max_tokens, int) and limit < max_tokens <= MAX_TOKENS:  # above: the schema's
            yield ctx.problem(("max_tokens",), f"max_tokens {max_tokens} does not fit in model "
                              f"'{options['model']}' (context_length {limit})",
                              "the prompt and the answer share the context: lower max_tokens, or raise "
                              f"models.{options['model']}.context_length")
        if "messages" in options and ("system" in options or "user" in options):
            yield ctx.problem(("messages",), "give either messages or system/user, not both", key=True)
        elif "messages" not in options and "user" not in options:
            yield ctx.problem((), "a prompt needs a user message", "add user: ... or messages: [...]")
        for name in ("system", "user"):
            value = options.get(name)
            if isinstance(value, dict) and isinstance(value.get("file"), str) and not _templated(
                    value["file"]) and not (ctx.spec_dir / value["file"]).is_file():
                yield ctx.problem((name, "file"), f"file not found: {value['file']}",
                                  "paths are relative to the spec's folder")
        images = options.get("images")
        for i, image in enumerate(images if isinstance(images, list) else []):
            if isinstance(image, str) and not _templated(image) and not (ctx.spec_dir / image).is_file():
                yield ctx.problem(("images", i), f"image not found: {image}",
                                  "paths are relative to the spec's folder")
        schema = options.get("response_schema")
        if isinstance(schema, str) and _templated(schema):
            yield ctx.problem(("response_schema",), "a response_schema path cannot use references",
                              "the answer's shape must be known before the run: name one file")
            return
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
        from ..spec.servers import link_problem, parse_fallback

        aliases = dict.fromkeys(ctx.model_aliases)
        for i, link in enumerate(parse_fallback(options.get("fallback"))):
            problem = link_problem(link, aliases, ctx.spec_dir)  # type: ignore[arg-type]
            if problem:
                yield ctx.problem(("fallback", i), *problem)
        setting = options.get("response_cache")
        if isinstance(setting, dict) and isinstance(setting.get("key"), str) \
                and re.fullmatch(FUNCTION_PATTERN, setting["key"]):
            from .python import function_problem

            problem = function_problem(setting["key"], ctx.spec_dir)
            if problem:
                yield ctx.problem(("response_cache", "key"), *problem)

    def prepare(self, options: dict[str, Any], spec_dir: Path) -> dict[str, Any]:
        prepared = dict(options)
        for name in ("system", "user"):
            # a file named by a reference (`${{ item.path }}`) is data, read when the step runs
            if isinstance(prepared.get(name), dict) and not _templated(prepared[name]["file"]):
                prepared[name] = (spec_dir / prepared[name]["file"]).read_text(encoding="utf-8")
        if isinstance(prepared.get("response_schema"), str):
            prepared["response_schema"] = _read_structured(spec_dir / prepared["response_schema"])
        return prepared

    def output_schema(self, options: dict[str, Any], spec_dir: Path) -> dict[str, Any] | None:
        return options.get("response_schema") or {"type": "string"}

    def cache_material(self, options: dict[str, Any], spec_dir: Path) -> Any:
        """The content of the files the resolved options name (images, prompt files named by a
        reference): a changed file is a changed step."""
        from ..spec.servers import parse_fallback
        from .python import source_hash

        files = [*(options.get("images") or []),
                 *(options[n]["file"] for n in ("system", "user") if isinstance(options.get(n), dict))]
        material: dict[str, Any] = {
            name: hashlib.sha256(_read_bytes(spec_dir, name)).hexdigest() for name in files
            if not _templated(name)}  # a checkpoint's options before they are resolved
        # the code that may answer (the step's python fallbacks; the model's own are in its
        # identity) or pick the cached answer (a response-cache key function)
        functions = [link.target for link in parse_fallback(options.get("fallback")) if link.kind == "python"]
        setting = options.get("response_cache")
        if isinstance(setting, dict) and isinstance(setting.get("key"), str):
            functions.append(setting["key"])
        if functions:
            material["code"] = {ref: source_hash(ref, spec_dir) for ref in functions}
        return material

    def messages(self, options: dict[str, Any], spec_dir: Path) -> list[dict[str, Any]]:
        if "messages" in options:
            return [dict(m) for m in options["messages"]]
        messages: list[dict[str, Any]] = []
        text = {name: _read(spec_dir, value["file"], name) if isinstance(value, dict) else value
                for name, value in ((n, options.get(n)) for n in ("system", "user"))}
        if text["system"]:
            messages.append({"role": "system", "content": text["system"]})
        user: Any = text["user"]
        if options.get("images"):
            user = [{"type": "text", "text": user}]
            for image in options["images"]:
                path = spec_dir / image
                mime = mimetypes.guess_type(path.name)[0] or "image/png"
                data = base64.b64encode(_read_bytes(spec_dir, image)).decode()
                user.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
        messages.append({"role": "user", "content": user})
        return messages

    def links(self, options: dict[str, Any], models: dict[str, Any]) -> list[Link]:
        """The fallback chain: the model, then the step's fallback, else the model's own."""
        from ..spec.servers import parse_fallback

        model = models.get(options["model"])
        fallback = parse_fallback(options["fallback"]) if "fallback" in options else (
            model.fallback if model is not None else ())
        return [Link("model", options["model"]), *fallback]

    def plan_lines(self, step: StepSpec, params: dict[str, Any]) -> list[str]:
        setting = step.options.get("response_cache")
        if setting is False:
            return ["     response cache off for this step"]
        if isinstance(setting, dict):
            ttl = f"ttl {setting['ttl']}" if "ttl" in setting else ""
            key = f"key {setting['key']} (answers shared by requests it maps to one key)" \
                if "key" in setting else ""
            return ["     response cache: " + ", ".join(x for x in (ttl, key) if x)] if ttl or key else []
        return []

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
            if ctx.stopping is not None and ctx.stopping.is_set():
                # a retry after the run's end: a request now could make a server load the model
                # again (LM Studio's JIT) after the run unloaded it
                raise RunStopping(f"the run is stopping: not asking '{alias}' again")
            backend, model = ctx.session.ready(alias)
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
