"""A step's policy (retries, timeouts, caching, from `defaults:` and the step) and the run's resilience
blocks (breaker, guard, response_cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .loader import Document
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

