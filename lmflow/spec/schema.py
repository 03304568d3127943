"""The spec's JSON Schema: the shipped base plus every registered step kind and backend."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib.resources import files
from typing import Any

from ..backends import DEFAULT_BACKEND, backend_classes
from ..steps import kinds

#: the server keys every backend reads (the others are each backend's `server_options`)
COMMON_SERVER_KEYS = ("backend", "startup_timeout", "parallel")
COMMON_STEP_KEYS = ("id", "description", "retries", "retry_delay", "backoff", "timeout", "timeout_growth",
                    "cache", "foreach", "when", "parallel", "on_item_error", "grain", "distribute",
                    "after")


@lru_cache(maxsize=1)
def base_schema() -> dict[str, Any]:
    return json.loads(files("lmflow.spec").joinpath("spec.schema.json").read_text("utf-8"))


def spec_schema() -> dict[str, Any]:
    """The full schema, as `lmflow schema` prints it and as validation uses it."""
    from ..steps.base import FALLBACK_OPTION

    schema = copy.deepcopy(base_schema())
    schema["$defs"]["model"]["properties"]["fallback"] = copy.deepcopy(FALLBACK_OPTION)
    step = schema["$defs"]["step"]
    registered = kinds()
    for name, kind in registered.items():
        options = copy.deepcopy(kind.options_schema)
        if kind.summary:
            options.setdefault("description", kind.summary)
        step["properties"][name] = options
    step["additionalProperties"] = False
    # exactly one kind per step; the validator reports this one itself, clearly
    step["oneOf"] = [{"required": [name]} for name in registered]
    _add_backends(schema["$defs"]["server"])
    return schema


def _add_backends(server: dict[str, Any]) -> None:
    """Each registered backend's name and options; a backend's server refuses the others' options
    (`false` in its branch: the validator says so itself, naming the backend's own options)."""
    classes = backend_classes()
    backend = server["properties"]["backend"]
    backend["enum"] = list(classes)
    backend["default"] = DEFAULT_BACKEND
    backend["description"] = "; ".join(f"{name}: {cls.summary}" for name, cls in classes.items())
    options = server["properties"]
    for cls in classes.values():
        for name, option in cls.server_options.items():
            options.setdefault(name, copy.deepcopy(option))
    branches = []
    for name, cls in classes.items():
        chosen: dict[str, Any] = {"properties": {"backend": {"const": name}}, "required": ["backend"]}
        if name == DEFAULT_BACKEND:
            chosen = {"anyOf": [chosen, {"not": {"required": ["backend"]}}]}
        own = {key: copy.deepcopy(option) for key, option in cls.server_options.items()}
        others = {key: False for key in options if key not in own and key not in COMMON_SERVER_KEYS}
        branches.append({"if": chosen, "then": {"properties": {**own, **others}}})
    server["allOf"] = branches
