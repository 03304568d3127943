"""What the SDK websocket protocol (sdk_ws.py) tells a client about models: a model as LM Studio lists
it (`LlmInfo`, `EmbeddingModelInfo`), a loaded instance (`...InstanceInfo`), an instance's load
config, and which instances an SDK name picks.

Read from the `lmstudio` 1.5 SDK's schemas. An LLM and an embedding model differ in their `type`,
in the fields only an LLM has (`vision`, `trainedForToolUse`) and in the namespace of their load
config's keys (`llm.load.*`, `embedding.load.*`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from .pool import gguf_general

if TYPE_CHECKING:
    from .config import TestModel
    from .pool import Instance

#: the SDKs' maxParallelPredictions (an LLM's load config only)
PARALLEL_KEY = "llm.load.numParallelSessions"

#: the load config fields each instance was asked for, reported back by getLoadConfig as LM Studio
#: does (gpu offload and the like, which the test server accepts and cannot apply); keyed by the
#: instance's engine, which lives exactly as long as the instance (an Instance is not hashable)
asked_config: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def context_key(model_type: str) -> str:
    """The load config key of the context length, for an LLM or an embedding model."""
    return f"{model_type}.load.contextLength"


def model_info(model: TestModel) -> dict[str, Any]:
    """A model as LM Studio lists it (`LlmInfo`, `EmbeddingModelInfo`: downloaded models, a load's
    `resolved`)."""
    info: dict[str, Any] = {
        "type": model.type, "modelKey": model.key, "format": "gguf", "displayName": model.key,
        "path": model.lmstudio_path, "sizeBytes": model.path.stat().st_size,
        "maxContextLength": model.max_context_length,
    }
    if model.type == "llm":
        info.update(vision=False, trainedForToolUse=False)
    general = gguf_general(model.path)
    if "general.architecture" in general:
        info["architecture"] = general["general.architecture"]
    if "general.size_label" in general:
        info["paramsString"] = general["general.size_label"]
    return info


def named(instances: list[Instance], wanted: str | None) -> list[Instance]:
    """The instances an SDK name picks: by identifier, else by their model (`TestModel.matches`;
    None: all)."""
    return [i for i in instances if wanted is None or i.id == wanted] or [
        i for i in instances if wanted and i.model.matches(wanted)]


def instance_info(instance: Instance) -> dict[str, Any]:
    """A loaded instance as LM Studio describes it (`LlmInstanceInfo`, `EmbeddingModelInstanceInfo`)."""
    return {**model_info(instance.model), "identifier": instance.id,
            "instanceReference": instance.id, "contextLength": instance.context_length}


def load_config(instance: Instance) -> dict[str, Any]:
    """The instance's load config (a KV config): what it was asked for, with the sizes it got."""
    fields = {**asked_config.get(instance.engine, {}),
              context_key(instance.model.type): instance.context_length}
    if instance.model.type == "llm":
        fields[PARALLEL_KEY] = instance.parallel
    return {"fields": [{"key": key, "value": value} for key, value in fields.items()]}
