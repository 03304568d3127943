"""The validated, typed form of a spec."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SERVER = "default"
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: float | int | str) -> float:
    """`30`, `"30s"`, `"5m"`, `"500ms"` -> seconds (the schema has checked the form)."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 500ms)")
    return float(match.group(1)) * _UNIT[match.group(2)]


@dataclass(frozen=True)
class ServerConfig:
    name: str
    backend: str = "local"
    url: str | None = None
    api_key_env: str | None = None
    start: str | None = None
    startup_timeout: float = 60.0
    max_restarts: int = 3
    threads: int | None = None
    parallel: int | None = None
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    alias: str
    key: str
    server: str = DEFAULT_SERVER
    path: str | None = None
    context_length: int | str | None = None  # str: "probed" or "probed - N%"
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    keep_loaded: bool = False
    ttl: float | None = None  # lmstudio: idle seconds before the server unloads it
    gpu: str | float | None = None  # lmstudio: "max", "off" or a 0..1 offload ratio
    identifier: str | None = None  # lmstudio: the instance's name on the server

    def identity(self) -> dict[str, Any]:
        """Everything about the model that changes its answers (part of cache keys)."""
        return {
            "key": self.key,
            "server": self.server,
            "path": self.path,
            "context_length": self.context_length,
            "options": self.options,
            "gpu": self.gpu,
        }


@dataclass(frozen=True)
class Policy:
    """Retries, backoff, timeout and cache for one step."""

    retries: int = 0
    retry_delay: float = 1.0
    backoff: float = 2.0
    timeout: float = 120.0
    cache: bool = True
    cache_ttl: float | None = None

    def retry_delays(self) -> list[float]:
        return [round(self.retry_delay * self.backoff**i, 3) for i in range(self.retries)]


@dataclass(frozen=True)
class StepSpec:
    id: str
    kind: str
    options: dict[str, Any]
    policy: Policy
    index: int
    description: str | None = None
    depends_on: tuple[str, ...] = ()


@dataclass
class Spec:
    file: Path
    name: str
    version: int
    description: str | None
    params: dict[str, Any]
    servers: dict[str, ServerConfig]
    models: dict[str, ModelConfig]
    defaults: Policy
    steps: list[StepSpec]  # in execution order (dependencies first)

    @property
    def dir(self) -> Path:
        return self.file.parent

    def step(self, step_id: str) -> StepSpec:
        return next(s for s in self.steps if s.id == step_id)
