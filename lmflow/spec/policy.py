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


def check_resilience(doc: Document) -> tuple[Breaker, Guard | None, ResponseCacheConfig | None]:
    """The top-level breaker, guard and response_cache blocks (their forms are schema-checked)."""
    data = doc.data

    def block(name: str) -> dict[str, Any] | None:
        return data[name] if isinstance(data.get(name), dict) else None

    def safe(parse: Any, value: Any, default: Any) -> Any:
        try:
            return parse(value) if value is not None else default
        except (ValueError, TypeError):
            return default  # already reported by the schema

    breaker = Breaker()
    if (raw := block("breaker")) is not None:
        failures = raw.get("failures", breaker.failures)
        breaker = Breaker(failures=failures if isinstance(failures, int) else breaker.failures,
                          cooldown=safe(parse_duration, raw.get("cooldown"), breaker.cooldown))
    guard = None
    if (raw := block("guard")) is not None:
        idle = raw.get("min_cpu_idle")
        guard = Guard(min_free_memory=safe(parse_size, raw.get("min_free_memory"), None),
                      min_cpu_idle=safe(lambda v: float(str(v).strip().rstrip("%")) / 100, idle, None),
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


def duration_or_none(value: Any) -> float | None:
    try:
        return parse_duration(value) if value is not None else None
    except (ValueError, TypeError):
        return None  # reported by the schema


#: the policy's fields (in `defaults:` and on a step) and what each takes: decided before the run
#: starts, so a `${{ }}` in them may name params only
_FIELDS: dict[str, str] = {"retries": "count", "retry_delay": "duration", "backoff": "factor",
                           "timeout": "duration", "timeout_growth": "factor", "max_parallel": "count"}
_TAKES = {"count": "a whole number", "duration": "a duration such as 30s or 2m", "factor": "a number >= 1"}


def with_params(doc: Document, path: PathT, raw: dict[str, Any], params: dict[str, Any],
                problems: list[Problem]) -> dict[str, Any]:
    """`raw` (`defaults:` or a step) with each policy field that uses `${{ params.X }}` set to its
    value for this run (`-p`), checked as the field's own value would be; a reference to anything
    but params there is a problem (a policy is decided before any step runs)."""
    resolved = dict(raw)
    for key, value in [(key, raw[key]) for key in _FIELDS if key in raw]:
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
            takes = _FIELDS[key]
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


def _is(takes: str, value: Any) -> bool:
    if takes == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if takes == "factor":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1
    try:
        return not isinstance(value, bool) and parse_duration(value) > 0
    except (ValueError, TypeError):
        return False


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

