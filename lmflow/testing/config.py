"""The test server's configuration: the models it offers and how it behaves (`--config FILE`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends.catalog import BUNDLED, locate
from ..errors import LmflowError, SpecError
from ..home import subdir
from ..spec.loader import load_yaml


@dataclass
class TestModel:
    """A model the server offers, with the limits it pretends to have."""

    key: str
    path: Path
    max_context_length: int = 8192  # what GET /models declares
    loadable_context_length: int | None = None  # larger loads fail, or clamp (below)
    clamp: bool = False  # True: load silently at loadable_context_length instead of failing
    #: beyond this many prompt tokens the model silently loses the start of its prompt
    working_context_length: int | None = None
    #: "model": llama-server answers; "retriever": answers "pass key" questions from the
    #: text it kept, perfectly (a stand-in for a model that can retrieve, which the
    #: bundled 135M model cannot), so probes have a known ground truth
    answers: str = "model"


@dataclass
class Behaviour:
    """How the server behaves: the keys of its config file (CONFIG_SCHEMA)."""

    models: list[TestModel]
    jit: bool = True
    api_token: str | None = None
    delay_seconds: float = 0.0  # before every chat answer
    #: a REST load is answered this long after its instance is listed (a client killed in
    #: between was killed mid-load: the instance is there, the client never heard of it)
    load_answer_delay_seconds: float = 0.0
    #: "v0": an LM Studio before 0.4, with no REST v1 (every /api/v1/ path answers 404)
    rest_api: str = "v1"
    ignore_model_field: bool = False  # answer with the loaded model, whatever was asked
    crash_on_request: int | None = None  # exit the process during the Nth chat request
    ttl_seconds: float | None = None  # unload instances idle for that long
    #: answer this share of chat requests with `error_status` instead (seeded: the same requests
    #: fail in every run), e.g. 0.3 for a server that fails 30% of the time
    error_rate: float = 0.0
    error_status: int = 503
    error_seed: int = 0


def installed_models() -> list[TestModel]:
    """The bundled models that are installed here (what `lmflow testing serve` offers by default)."""
    models = []
    for key in BUNDLED:
        try:
            models.append(TestModel(key=key, path=locate(key, subdir("models"))))
        except LmflowError:
            continue
    return models


_COUNT = {"type": "integer", "minimum": 1}
_SECONDS = {"type": "number", "minimum": 0}
#: the config file `lmflow testing serve --config` reads (README: "Testing your specs without LM Studio")
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "models": {"type": "array", "items": {
            "type": "object", "required": ["key"], "additionalProperties": False,
            "properties": {
                "key": {"type": "string", "minLength": 1}, "file": {"type": "string"},
                "path": {"type": "string"}, "max_context_length": _COUNT,
                "loadable_context_length": {"anyOf": [_COUNT, {"type": "null"}]},
                "clamp": {"type": "boolean"},
                "working_context_length": {"anyOf": [_COUNT, {"type": "null"}]},
                "answers": {"enum": ["model", "retriever"]}}}},
        "jit": {"type": "boolean"},
        "api_token": {"type": ["string", "null"]},
        "delay_seconds": _SECONDS,
        "load_answer_delay_seconds": _SECONDS,
        "ignore_model_field": {"type": "boolean"},
        "crash_on_request": {"anyOf": [_COUNT, {"type": "null"}]},
        "ttl_seconds": {"anyOf": [_SECONDS, {"type": "null"}]},
        "error_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "error_status": {"type": "integer", "minimum": 400, "maximum": 599},
        "error_seed": {"type": "integer"},
        "rest_api": {"enum": ["v0", "v1"]},
    },
}


def load_behaviour(path: str | Path | None) -> Behaviour:
    """Read a config file (YAML, checked against CONFIG_SCHEMA); with no file, serve the installed
    bundled models."""
    from jsonschema import Draft202012Validator

    if path is None:
        return Behaviour(models=installed_models())
    doc = load_yaml(path)
    data = doc.data if doc.data is not None else {}
    problems = [doc.problem(tuple(error.absolute_path), error.message)
                for error in Draft202012Validator(CONFIG_SCHEMA).iter_errors(data)]
    if problems:
        raise SpecError(problems)
    models = []
    for i, item in enumerate(data.get("models") or []):
        model_path = item.get("path")
        bundled = item.get("file", item["key"])
        if model_path:
            resolved = Path(doc.file).parent / model_path
        elif bundled in BUNDLED:
            resolved = locate(bundled, subdir("models"))
        else:
            raise SpecError([doc.problem(("models", i, "key"), f"'{bundled}' is not a bundled model",
                                         f"add file: one of {', '.join(BUNDLED)}, or path: model.gguf")])
        models.append(TestModel(
            key=item["key"], path=resolved,
            max_context_length=int(item.get("max_context_length", 8192)),
            loadable_context_length=item.get("loadable_context_length"),
            clamp=bool(item.get("clamp", False)),
            working_context_length=item.get("working_context_length"),
            answers=item.get("answers", "model")))
    return Behaviour(models=models, **{k: v for k, v in data.items() if k != "models"})
