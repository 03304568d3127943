"""A step's policy (retries, timeouts, caching, from `defaults:` and the step) and the run's resilience
blocks (breaker, guard, response_cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import Problem
from . import templates
from .loader import Document, PathT
from .model import (
    Breaker,
    Guard,
    Policy,
    ResponseCacheConfig,
    parse_duration,
    parse_size,
)


def check_resilience(doc: Document, params: dict[str, Any],
                     problems: list[Problem]) -> tuple[Breaker, Guard | None, ResponseCacheConfig | None]:
    """The top-level breaker, guard and response_cache blocks (their forms are schema-checked; a
    field may take this run's params, `${{ params.X }}`, as `with_params` says)."""
    data = doc.data

    def block(name: str) -> dict[str, Any] | None:
        if not isinstance(data.get(name), dict):
            return None
        return with_params(doc, (name,), data[name], params, problems, BLOCK_FIELDS[name])

    def safe(parse: Any, value: Any, default: Any) -> Any:
        try:
            return parse(value) if value is not None else default
        except (ValueError, TypeError):
            return default  # already reported by the schema (or by with_params)

    breaker = Breaker()
    if (raw := block("breaker")) is not None:
        failures = raw.get("failures", breaker.failures)
        breaker = Breaker(failures=failures if isinstance(failures, int) else breaker.failures,
                          cooldown=safe(parse_duration, raw.get("cooldown"), breaker.cooldown))
    guard = None
    if (raw := block("guard")) is not None:
        guard = Guard(min_free_memory=safe(parse_size, raw.get("min_free_memory"), None),
                      min_cpu_idle=safe(parse_percent, raw.get("min_cpu_idle"), None),
                      action=raw["action"] if raw.get("action") in ("fallback", "wait", "fail")
                      else "fallback",
                      wait=safe(parse_duration, raw.get("wait"), 60.0))
    cache = None
    if (raw := block("response_cache")) is not None:
        folder = raw.get("dir")
        cache = ResponseCacheConfig(
            ttl=safe(parse_duration, raw.get("ttl"), None),
            size_limit=safe(parse_size, raw.get("size_limit"), ResponseCacheConfig.size_limit),
            directory=str(Path(doc.file).resolve().parent / Path(folder).expanduser())
            if isinstance(folder, str) else None)
    return breaker, guard, cache


def parse_percent(value: Any) -> float:
    """`20%` -> 0.2."""
    number = float(str(value).strip().rstrip("%"))
    if not 0 <= number <= 100:
        raise ValueError(f"{value!r} is not between 0% and 100%")
    return number / 100


def duration_or_none(value: Any) -> float | None:
    try:
        return parse_duration(value) if value is not None else None
    except (ValueError, TypeError):
        return None  # reported by the schema


#: the fields that may take this run's params (`${{ params.X }}`) and what each takes: decided
#: before any step runs, so a reference there may name params only. A step's and `defaults:`'s
#: policy, a step's `parallel` and `cache.ttl`, and the resilience blocks' fields.
FIELDS: dict[str, str] = {"retries": "count", "retry_delay": "duration", "backoff": "factor",
                          "timeout": "duration", "timeout_growth": "factor", "max_parallel": "positive",
                          "parallel": "positive"}
BLOCK_FIELDS: dict[str, dict[str, str]] = {
    "breaker": {"failures": "positive", "cooldown": "duration"},
    "guard": {"min_free_memory": "size", "min_cpu_idle": "percent", "wait": "duration"},
    "response_cache": {"ttl": "duration", "size_limit": "size"},
    "cache": {"ttl": "duration"},  # a step's (or defaults') `cache: {ttl: ...}`
}
_TAKES = {"count": "a whole number", "positive": "a whole number >= 1",
          "duration": "a duration such as 30s or 2m", "factor": "a number >= 1",
          "size": "a size such as 500MB or 2GiB", "percent": "a percentage such as 20%"}


def with_params(doc: Document, path: PathT, raw: dict[str, Any], params: dict[str, Any],
                problems: list[Problem], fields: dict[str, str] | None = None) -> dict[str, Any]:
    """`raw` (`defaults:`, a step, or a block of `BLOCK_FIELDS`) with each of its `fields` (default:
    the policy's) that uses `${{ params.X }}` set to its value for this run (`-p`), checked as the
    field's own value would be; a reference to anything but params there is a problem (it is
    decided before any step runs). A `cache: {ttl: ...}` inside is resolved the same way."""
    fields = FIELDS if fields is None else fields
    resolved = dict(raw)
    if fields is FIELDS and isinstance(raw.get("cache"), dict):
        resolved["cache"] = with_params(doc, path + ("cache",), raw["cache"], params, problems,
                                        BLOCK_FIELDS["cache"])
    for key, value in [(key, raw[key]) for key in fields if key in raw]:
        if not isinstance(value, str) or "${{" not in value:
            continue
        try:
            refs = [templates.parse_ref(expr) for _, expr in templates.iter_templates(value)]
            other = next((r for r in refs if r.root != "params"), None)
            if other is not None:
                raise templates.TemplateError(f"'{other.text}': {key} is decided before any step runs, "
                                              f"so it may refer to params only")
            value = templates.render(value, {"params": params})
        except templates.TemplateError as exc:
            problems.append(doc.problem(path + (key,), str(exc), f"e.g. {key}: ${{{{ params.{key} }}}}"))
            value = None
        else:
            takes = fields[key]
            if not _is(takes, value):
                problems.append(doc.problem(path + (key,), f"{key} is {value!r} with this run's params: "
                                            f"expected {_TAKES[takes]}", "fix the param's value (-p) or "
                                            "its default"))
                value = None
        if value is None:
            resolved.pop(key)
        else:
            resolved[key] = value
    return resolved


def takes_params(path: PathT, kinds: Any) -> bool:
    """Whether the spec field at `path` may hold a `${{ }}`: a kind's options (resolved when the
    step runs), a server's fields, params and a map's `foreach`/`when`, and the fields above."""
    if not path:
        return False
    head = path[0]
    if head in ("params", "server", "servers"):
        return True
    if head in BLOCK_FIELDS and len(path) == 2:
        return path[1] in BLOCK_FIELDS[head]
    if head == "defaults" and len(path) >= 2:
        return path[1] in FIELDS or path[1:] == ("cache", "ttl")
    if head == "steps" and len(path) >= 3:
        key = path[2]
        return (key in kinds or key in FIELDS or key in ("foreach", "when")
                or path[2:] == ("cache", "ttl"))
    return False


def _is(takes: str, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if takes in ("count", "positive"):
        return isinstance(value, int) and value >= (1 if takes == "positive" else 0)
    if takes == "factor":
        return isinstance(value, (int, float)) and value >= 1
    parse = {"duration": parse_duration, "size": parse_size, "percent": parse_percent}[takes]
    try:
        parsed = parse(value)
    except (ValueError, TypeError):
        return False
    return parsed > 0 or takes != "duration"


def step_policy(raw: dict[str, Any], base: Policy) -> Policy:
    def duration(key: str, current: float) -> float:
        try:
            return parse_duration(raw[key]) if key in raw else current
        except (ValueError, TypeError):
            return current  # already reported by the schema

    cache, ttl = base.cache, base.cache_ttl
    if isinstance(raw.get("cache"), bool):
        cache = raw["cache"]
    elif isinstance(raw.get("cache"), dict):
        cache = True
        try:
            ttl = parse_duration(raw["cache"]["ttl"]) if "ttl" in raw["cache"] else ttl
        except (ValueError, TypeError):
            pass  # already reported by the schema
    retries = raw.get("retries", base.retries)
    backoff = raw.get("backoff", base.backoff)
    growth = raw.get("timeout_growth", base.timeout_growth)
    return Policy(
        retries=retries if isinstance(retries, int) else base.retries,
        retry_delay=duration("retry_delay", base.retry_delay),
        backoff=float(backoff) if isinstance(backoff, (int, float)) else base.backoff,
        timeout=duration("timeout", base.timeout),
        cache=cache,
        cache_ttl=ttl,
        timeout_growth=(float(growth) if isinstance(growth, (int, float)) and growth >= 1
                        else base.timeout_growth),
    )

