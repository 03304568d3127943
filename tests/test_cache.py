"""The response cache on its own: TTL, size limit with eviction, a corrupt database."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmflow.cache import MISSING, ResponseCache, clear, describe, response_key


def test_answers_expire_after_their_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diskcache.core

    now = [time.time()]  # diskcache's clock, moved by the test: however slow the box, nothing expires early
    monkeypatch.setattr(diskcache.core, "time", SimpleNamespace(time=lambda: now[0], sleep=time.sleep))
    cache = ResponseCache(tmp_path / "c")
    cache.set("k", {"output": 1}, ttl=0.2)
    now[0] += 0.1
    assert cache.get("k") == {"output": 1}
    now[0] += 0.2
    assert cache.get("k") is MISSING
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    cache.close()


def test_the_size_limit_evicts_the_oldest_answers(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c", size_limit=200_000)
    for i in range(300):
        cache.set(f"k{i}", {"output": "x" * 4000})
    info = describe(tmp_path / "c")
    assert info["entries"] < 300 and info["bytes"] <= 200_000 + 8000  # culled as it grows
    assert cache.get("k299") is not MISSING and cache.get("k0") is MISSING  # the newest stay
    cache.close()


def test_a_corrupt_database_is_reported_once_and_bypassed(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    ResponseCache(folder).set("k", 1)
    (folder / "cache.db").write_bytes(b"garbage" * 1000)
    warnings: list[str] = []
    cache = ResponseCache(folder, warn=warnings.append)
    assert cache.get("k") is MISSING
    cache.set("k", 2)  # no exception, nothing stored
    assert cache.get("k") is MISSING
    assert len(warnings) == 1 and "running without it: `lmflow cache clear` removes it" in warnings[0]
    clear(folder)
    fresh = ResponseCache(folder)
    fresh.set("k", 3)
    assert fresh.get("k") == 3
    fresh.close()


def test_keys_change_with_what_changes_the_answer() -> None:
    base = {"model": {"key": "m", "context_length": 2048}, "messages": [{"role": "user", "content": "hi"}],
            "sampling": {"seed": 1}, "schema": None}
    assert response_key(base) == response_key(dict(base))
    for change in ({"model": {"key": "m", "context_length": 4096}}, {"sampling": {"seed": 2}},
                   {"schema": {"type": "object"}}, {"messages": [{"role": "user", "content": "hello"}]}):
        assert response_key({**base, **change}) != response_key(base)
