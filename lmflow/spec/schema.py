"""The spec's JSON Schema: the shipped base plus every registered step kind."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib.resources import files
from typing import Any

from ..steps import kinds

COMMON_STEP_KEYS = ("id", "description", "retries", "retry_delay", "backoff", "timeout", "timeout_growth",
                    "cache", "foreach", "when", "parallel", "on_item_error", "after")


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
    return schema
