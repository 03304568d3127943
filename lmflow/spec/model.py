"""The validated, typed form of a spec."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SERVER = "default"
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_SIZE_UNIT = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: float | int | str) -> int:
    """`1024`, `"500MB"`, `"2GiB"` -> bytes (the schema has checked the form)."""
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 500MB, 2GB)")
    return int(float(match.group(1)) * _SIZE_UNIT[(match.group(2) or "b").lower()])


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
    backend: str = "local"  # lmflow.backends.DEFAULT_BACKEND
    url: str | None = None
    api_key_env: str | None = None
    start: str | None = None
    #: stops a server that `start` left running as a daemon (None: `lms server stop` after
    #: `lms server start`, else nothing: such a server is left running, and the run says so)
    stop: str | None = None
    startup_timeout: float = 60.0
    max_restarts: int = 3
    threads: int | None = None
    parallel: int | None = None
    args: tuple[str, ...] = ()
    #: hold a Prefect global concurrency limit per server around every model call, shared by all
    #: runs and workers (lmflow.prefect.limits); off unless asked: it costs ~0.1 s per call
    shared_limit: bool = False
    #: the options of a plugin backend (server keys that are none of the fields above)
    options: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Link:
    """One link of a fallback chain: a model alias, a `module:function` or a static value."""

    kind: str  # model | python | value
    target: Any

    def describe(self) -> str:
        return {"model": f"model {self.target}", "python": f"python {self.target}"}.get(
            self.kind, "static value")


@dataclass(frozen=True)
class ModelConfig:
    alias: str
    key: str
    server: str = DEFAULT_SERVER
    path: str | None = None
    #: str: "probed" / "probed - N%" (the working maximum) or "probed: loadable" / "probed: loadable - N%"
    #: (the loadable one), read from the probe registry when the model is used (probe.probed_size)
    context_length: int | str | None = None
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    keep_loaded: bool = False
    ttl: float | None = None  # lmstudio: idle seconds before the server unloads it
    gpu: str | float | None = None  # lmstudio: "max", "off" or a 0..1 offload ratio
    identifier: str | None = None  # lmstudio: the instance's name on the server
    #: requests in flight to this model at once (local: llama-server -np; lmstudio: maxParallelPredictions)
    parallel: int | None = None
    #: what answers when this model cannot, in order (not followed further: chains do not nest)
    fallback: tuple[Link, ...] = field(default=(), hash=False)

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
    timeout_growth: float = 1.0  # each retry may wait this much longer than the one before

    def attempt_timeout(self, attempt: int) -> float:
        """The timeout of attempt 1, 2, ...: `timeout`, then grown by `timeout_growth` each time."""
        return round(self.timeout * self.timeout_growth ** (attempt - 1), 3)

    def retry_delays(self) -> list[float]:
        return [round(self.retry_delay * self.backoff**i, 3) for i in range(self.retries)]


@dataclass(frozen=True)
class Foreach:
    """What a map step runs over: a list (literal or one reference), a dataset file or a glob."""

    source: str  # value | file | glob
    value: Any  # the list or reference; the path or pattern relative to the spec


@dataclass(frozen=True)
class StepSpec:
    id: str
    kind: str
    options: dict[str, Any]
    policy: Policy
    index: int
    description: str | None = None
    depends_on: tuple[str, ...] = ()
    foreach: Foreach | None = None
    #: a parsed `when` expression (lmflow.spec.expressions.Expression), or a constant bool
    when: Any = None
    #: map items in flight at once (default: the run's max_parallel)
    parallel: int | None = None
    on_item_error: str = "fail"  # fail | skip | collect
    #: how a map's items meet the executor: "item" (a unit each), N (chunks of N), "auto"
    grain: str | int = "auto"
    #: its chunks run on lmflow task workers, wherever they are (lmflow.prefect.distributed); None
    #: as written when the step does not say (`defaults.distribute` decides, in `load_spec`)
    distribute: bool | None = False
    #: for a kind that holds steps (`Step.holds`): what its `check_nested` parsed (a loop's
    #: stop condition and checkpoints)
    nested: Any = None
    #: every step it holds, in the order written
    held: tuple[StepSpec, ...] = ()
    #: the step that holds this one (None: a top-level step)
    parent: str | None = None


@dataclass(frozen=True)
class Breaker:
    """After `failures` consecutive failures a model is skipped for `cooldown` seconds."""

    failures: int = 3
    cooldown: float = 30.0


@dataclass(frozen=True)
class Guard:
    """Below these resources a model link is not tried: the chain falls back, waits or fails."""

    min_free_memory: int | None = None  # bytes
    min_cpu_idle: float | None = None  # share of CPU time idle, 0..1
    action: str = "fallback"  # fallback | wait | fail
    wait: float = 60.0  # action wait: how long to wait for resources before falling back


@dataclass(frozen=True)
class ResponseCacheConfig:
    """The response cache (diskcache): answers keyed by everything that changes them."""

    ttl: float | None = None
    size_limit: int = 1 << 30
    directory: str | None = None  # default: the cache folder under lmflow's home


@dataclass(frozen=True)
class ScheduleSpec:
    """When a deployed spec runs: a cron line or an interval, in a time zone, with its own params."""

    cron: str | None = None
    interval: float | None = None  # seconds
    timezone: str | None = None
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    active: bool = True

    def describe(self) -> str:
        when = f"cron '{self.cron}'" if self.cron else f"every {self.interval:g}s"
        zone = f" ({self.timezone})" if self.timezone else ""
        extra = "".join(f" {k}={v!r}" for k, v in self.params.items())
        return when + zone + extra + ("" if self.active else " (paused)")


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
    breaker: Breaker = field(default_factory=Breaker)
    guard: Guard | None = None
    max_parallel: int = 4  # task runs (steps and map items) in flight at once
    response_cache: ResponseCacheConfig | None = None  # None: off unless a step turns it on
    #: when `lmflow deploy` / `lmflow serve` run it
    schedules: tuple[ScheduleSpec, ...] = ()

    @property
    def dir(self) -> Path:
        return self.file.parent

    def step(self, step_id: str) -> StepSpec:
        return self.by_id[step_id]

    @property
    def by_id(self) -> dict[str, StepSpec]:
        """Every step by id, the steps that steps hold included (ids are unique in a spec)."""
        found = self.__dict__.get("_by_id")
        if found is None or self.__dict__.get("_by_id_of") != len(self.steps):
            found = {s.id: s for s in self.steps}
            for step in self.steps:
                found.update((s.id, s) for s in step.held)
            self.__dict__["_by_id"], self.__dict__["_by_id_of"] = found, len(self.steps)
        return found
