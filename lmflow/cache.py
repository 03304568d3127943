"""The response cache: model answers on disk (diskcache), keyed by everything that changes them.

Only answers that came back valid are stored. A cache that cannot be opened,
read or written (a corrupt database, a folder that is not one, a full disk) is
reported once and bypassed: a run never fails because of its cache.

Worker threads share one ResponseCache. diskcache.Cache is thread-safe (one sqlite
connection per thread, kept in a threading.local), so reads and writes run
without lmflow's lock; the lock guards only what is lmflow's: opening the one
Cache object, marking it broken, and the counters.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .home import subdir

#: bump when the meaning of a cached answer changes
RESPONSE_CACHE_VERSION = 1
_MISSING = object()


def default_directory() -> Path:
    return subdir("cache") / "responses"


def response_key(material: Any) -> str:
    """A stable hash of the key material (model, load config, messages, sampling, schema, ...)."""
    text = json.dumps({"v": RESPONSE_CACHE_VERSION, "m": material}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CacheStats:
    """What the cache did for a run; changed only under the owning ResponseCache's lock."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    errors: list[str] = field(default_factory=list)
    hit_seconds: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "stores": self.stores, "errors": list(self.errors)}


class ResponseCache:
    """A diskcache.Cache opened on first use; every failure of it is reported, never raised."""

    def __init__(self, directory: str | Path | None = None, *, size_limit: int = 1 << 30,
                 warn: Any = lambda message: None):
        self.directory = Path(directory) if directory else default_directory()
        self.size_limit = size_limit
        self.stats = CacheStats()
        self._warn = warn
        self._cache: Any = None
        self.broken: str | None = None
        self._lock = threading.Lock()

    def _open(self) -> Any:
        cache = self._cache
        if cache is not None or self.broken is not None:
            return cache
        warning = None
        with self._lock:  # held while opening: threads asking at once get the same one
            if self._cache is None and self.broken is None:
                try:
                    import diskcache

                    self._cache = diskcache.Cache(str(self.directory), size_limit=self.size_limit,
                                                  eviction_policy="least-recently-stored")
                except Exception as exc:  # noqa: BLE001 - any failure to open means: run without it
                    warning = self._mark_broken("open", exc)
            cache = self._cache
        if warning:
            self._warn(warning)
        return cache

    def _fail(self, what: str, exc: BaseException) -> None:
        with self._lock:
            warning = self._mark_broken(what, exc)
        if warning:
            self._warn(warning)  # outside the lock: the callback may take its own

    def _mark_broken(self, what: str, exc: BaseException) -> str | None:
        """Record the failure (lock held); the message to warn with when it is the first."""
        message = (f"response cache at {self.directory} could not {what} ({type(exc).__name__}: "
                   f"{exc}); running without it: `lmflow cache clear` removes it")
        self.stats.errors.append(message)
        first = self.broken is None
        self.broken = message
        if self._cache is not None:
            # closes this thread's connection; diskcache keeps one per thread, and the others
            # close with their threads, after the call each is in ends
            try:
                self._cache.close()
            except Exception:  # noqa: BLE001 - it is already broken
                pass
            self._cache = None
        return message if first else None

    def get(self, key: str) -> Any:
        """The cached value, or `MISSING`."""
        started = time.perf_counter()
        cache = self._open()
        if cache is None:
            return _MISSING
        try:
            value = cache.get(key, default=_MISSING, retry=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt entry or database
            self._fail("be read", exc)
            return _MISSING
        with self._lock:
            if value is _MISSING:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
                self.stats.hit_seconds.append(time.perf_counter() - started)
        return value

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        cache = self._open()
        if cache is None:
            return
        try:
            cache.set(key, value, expire=ttl, retry=True)
        except Exception as exc:  # noqa: BLE001 - full disk, corrupt database
            self._fail("be written", exc)
            return
        with self._lock:
            self.stats.stores += 1

    def close(self) -> None:
        """Close the cache (this thread's connection; worker threads' close when they end)."""
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()


MISSING = _MISSING


def describe(directory: str | Path | None = None) -> dict[str, Any]:
    """`lmflow cache stats`: entries, bytes on disk and the directory."""
    import diskcache

    path = Path(directory) if directory else default_directory()
    if not path.exists():
        return {"directory": str(path), "entries": 0, "bytes": 0, "exists": False}
    with diskcache.Cache(str(path)) as cache:
        return {"directory": str(path), "entries": len(cache), "bytes": cache.volume(),
                "size_limit": cache.size_limit, "exists": True}


def clear(directory: str | Path | None = None) -> int:
    """`lmflow cache clear`: remove every entry (or the whole folder if it is corrupt)."""
    import shutil

    import diskcache

    path = Path(directory) if directory else default_directory()
    if not path.exists():
        return 0
    try:
        with diskcache.Cache(str(path)) as cache:
            return cache.clear(retry=True)
    except Exception:  # noqa: BLE001 - corrupt: start over
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        return 0
