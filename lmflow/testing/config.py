"""The test server's configuration: the models it offers and how it behaves (`--config FILE`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
    #: the model's path as LM Studio reports it: relative to its models folder,
    #: `PUBLISHER/REPO/FILE.gguf` (a model listed by key: `PUBLISHER/KEY/FILE.gguf`, where the
    #: publisher is the key's first part, or `local`)
    lmstudio_path: str = field(default="")

    def __post_init__(self) -> None:
        if not self.lmstudio_path:
            publisher, _, name = self.key.rpartition("/")
            self.lmstudio_path = f"{publisher or 'local'}/{name}/{self.path.name}"

    def matches(self, name: str) -> bool:
        """Whether an SDK name picks this model: its key, its path, or (with a `/`) the start of its
        path, case-insensitively (`hugging-quants/llama-3.2-1b-instruct` picks
        `hugging-quants/Llama-3.2-1B-Instruct-Q8_0-GGUF/...`), as LM Studio resolves them."""
        path, wanted = self.lmstudio_path.lower(), name.lower()
        return name == self.key or wanted == path or ("/" in wanted and path.startswith(wanted))


#: a quantization at the end of a GGUF file name (`-Q4_K_M`, `.Q8_0`, `-f16`), which LM Studio's key
#: leaves out
_QUANT_SUFFIX = re.compile(r"[-._](i?q\d\w*|bf16|f16|f32)$", re.IGNORECASE)


def lmstudio_key(file_name: str) -> str:
    """The key LM Studio gives a GGUF file in its models folder: its name in lower case, without
    the quantization (`Qwen2.5-7B-Instruct-1M-Q4_K_M.gguf` is `qwen2.5-7b-instruct-1m`)."""
    return _QUANT_SUFFIX.sub("", Path(file_name).stem).lower()


def quantization(file_name: str) -> str | None:
    """The quantization a GGUF file name states (`...-Q4_1.gguf`), as LM Studio lists it."""
    found = re.search(r"(I?Q\d\w*?|BF16|F16|F32)(?:\.gguf)?$", Path(file_name).stem, re.IGNORECASE)
    return found.group(1).upper() if found else None


def models_folder(folder: Path) -> list[TestModel]:
    """The models in an LM Studio models folder: `PUBLISHER/REPO/FILE.gguf`, keyed as LM Studio keys
    them (two files with one key: the first, by path)."""
    models: dict[str, TestModel] = {}
    for path in sorted(folder.glob("*/*/*.gguf")):
        key = lmstudio_key(path.name)
        models.setdefault(key, TestModel(key=key, path=path,
                                         lmstudio_path=path.relative_to(folder).as_posix()))
    return list(models.values())


@dataclass
class Behaviour:
    """How the server behaves: the keys of its config file (CONFIG_SCHEMA)."""

    models: list[TestModel]
    #: an LM Studio models folder whose models are served too (`models_folder`)
    models_dir: Path | None = None
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
                "answers": {"enum": ["model", "retriever"]},
                "lmstudio_path": {"type": "string", "pattern": "^[^/]+/[^/]+/[^/]+$"}}}},
        "models_dir": {"type": "string"},
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
    folder = Path(doc.file).parent / data["models_dir"] if data.get("models_dir") else None
    if folder is not None and not folder.is_dir():
        raise SpecError([doc.problem(("models_dir",), f"{folder} is not a directory",
                                     "give LM Studio's models folder: PUBLISHER/REPO/FILE.gguf")])
    in_folder = {m.key: m for m in models_folder(folder)} if folder else {}
    models = []
    for i, item in enumerate(data.get("models") or []):
        model_path = item.get("path")
        bundled = item.get("file", item["key"])
        found = in_folder.pop(item["key"], None) if not model_path and "file" not in item else None
        lmstudio_path = item.get("lmstudio_path") or (found.lmstudio_path if found else "")
        if model_path:
            resolved = Path(doc.file).parent / model_path
        elif found:  # an entry for a model of models_dir: its limits
            resolved = found.path
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
            answers=item.get("answers", "model"), lmstudio_path=lmstudio_path))
    models += in_folder.values()
    return Behaviour(models=models, models_dir=folder,
                     **{k: v for k, v in data.items() if k not in ("models", "models_dir")})
