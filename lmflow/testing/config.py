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
    #: "llm", or "embedding": an embedding model, served by a llama-server started with
    #: `--embeddings` (any GGUF model can be one: a chat model's embeddings are its hidden states,
    #: pooled; see pool.py)
    type: str = "llm"
    #: a Jinja chat template that replaces the one in the model's file (LM Studio's per-model prompt
    #: template override), for llama-server's `--chat-template-file`; `chatml-tools` (TEMPLATES) gives
    #: a ChatML model the tool support its own template lacks (SmolLM2's drops a request's tools)
    chat_template: Path | None = None

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


#: the chat templates the test server ships, by the name a config gives them (`chat_template:`)
TEMPLATES = {"chatml-tools": Path(__file__).parent / "templates" / "chatml-tools.jinja"}

#: the GGUF architectures of embedding models (encoders), which LM Studio lists as embedding models
#: and which llama.cpp pools as their files say (inferred: LM Studio's list is not published)
EMBEDDING_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                                     "modern-bert", "neo-bert", "t5encoder"})
#: what LM Studio puts before the key of an embedding model (`text-embedding-nomic-embed-text-v1.5`
#: for `nomic-embed-text-v1.5.Q4_K_M.gguf`, the key the lmstudio SDK's own suite expects)
EMBEDDING_KEY_PREFIX = "text-embedding-"

#: a quantization at the end of a GGUF file name (`-Q4_K_M`, `.Q8_0`, `-f16`), which LM Studio's key
#: leaves out
_QUANT_SUFFIX = re.compile(r"[-._](i?q\d\w*|bf16|f16|f32)$", re.IGNORECASE)


def lmstudio_key(file_name: str, model_type: str = "llm") -> str:
    """The key LM Studio gives a GGUF file in its models folder: its name in lower case, without
    the quantization (`Qwen2.5-7B-Instruct-1M-Q4_K_M.gguf` is `qwen2.5-7b-instruct-1m`), after
    `text-embedding-` for an embedding model."""
    key = _QUANT_SUFFIX.sub("", Path(file_name).stem).lower()
    if model_type == "embedding" and not key.startswith(EMBEDDING_KEY_PREFIX):
        key = EMBEDDING_KEY_PREFIX + key
    return key


def quantization(file_name: str) -> str | None:
    """The quantization a GGUF file name states (`...-Q4_1.gguf`), as LM Studio lists it."""
    found = re.search(r"(I?Q\d\w*?|BF16|F16|F32)(?:\.gguf)?$", Path(file_name).stem, re.IGNORECASE)
    return found.group(1).upper() if found else None


def models_folder(folder: Path) -> list[TestModel]:
    """The models in an LM Studio models folder: `PUBLISHER/REPO/FILE.gguf`, keyed as LM Studio keys
    them (two files with one key: the first, by path); a file of an encoder architecture is an
    embedding model."""
    from .pool import gguf_general

    models: dict[str, TestModel] = {}
    for path in sorted(folder.glob("*/*/*.gguf")):
        architecture = gguf_general(path).get("general.architecture")
        model_type = "embedding" if architecture in EMBEDDING_ARCHITECTURES else "llm"
        key = lmstudio_key(path.name, model_type)
        models.setdefault(key, TestModel(key=key, path=path, type=model_type,
                                         lmstudio_path=path.relative_to(folder).as_posix()))
    return list(models.values())


@dataclass
class Behaviour:
    """How the server behaves: the keys of its config file (CONFIG_SCHEMA)."""

    models: list[TestModel]
    #: an LM Studio models folder whose models are served too (`models_folder`)
    models_dir: Path | None = None
    jit: bool = True
    #: LM Studio's "JIT models auto-evict" (on in LM Studio by default, off here by default so that
    #: tests may load several models just in time): a model loaded just in time unloads the ones
    #: loaded just in time before it
    jit_auto_evict: bool = False
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
                "type": {"enum": ["llm", "embedding"]},
                "chat_template": {"type": "string", "minLength": 1},
                "lmstudio_path": {"type": "string", "pattern": "^[^/]+/[^/]+/[^/]+$"}}}},
        "models_dir": {"type": "string"},
        "jit": {"type": "boolean"},
        "jit_auto_evict": {"type": "boolean"},
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
        model_type = item.get("type", "llm")
        found = None
        if not model_path and "file" not in item:  # an entry for a model of models_dir, by its key
            found = in_folder.pop(_folder_key(in_folder, item["key"], model_type), None)
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
        template = item.get("chat_template")
        template_path = (TEMPLATES.get(template) or Path(doc.file).parent / template) if template else None
        if template_path is not None and not template_path.is_file():
            raise SpecError([doc.problem(("models", i, "chat_template"), f"{template_path} is not a file",
                                         f"give a Jinja template file, or one of {', '.join(TEMPLATES)}")])
        models.append(TestModel(
            key=item["key"], path=resolved,
            max_context_length=int(item.get("max_context_length", 8192)),
            loadable_context_length=item.get("loadable_context_length"),
            clamp=bool(item.get("clamp", False)),
            working_context_length=item.get("working_context_length"),
            answers=item.get("answers", "model"), lmstudio_path=lmstudio_path, type=model_type,
            chat_template=template_path))
    models += in_folder.values()
    return Behaviour(models=models, models_dir=folder,
                     **{k: v for k, v in data.items() if k not in ("models", "models_dir")})


def _folder_key(in_folder: dict[str, TestModel], key: str, model_type: str) -> str:
    """The key in `in_folder` of the model a config entry names: its own key, or (an entry that
    makes a chat model's file an embedding model) the file whose embedding-model key it is."""
    if key in in_folder or model_type != "embedding":
        return key
    return next((k for k, m in in_folder.items() if lmstudio_key(m.path.name, "embedding") == key), key)
