"""Fallback chains, retries that heal, a circuit breaker and a resource guard.

A step that asks a model walks its chain: the model, then each fallback (other
models, plain code, a static value) until one answers. On each model link:

- the response cache answers first when it holds a valid answer;
- an open breaker skips the link at once (after `breaker.failures` consecutive
  calls that failed for good, for `breaker.cooldown`; then one call tests it);
- the resource guard skips it (or waits, or fails) when memory or CPU is short;
- a link known to hold fewer tokens than a context overflow needed is skipped;
- failures that can heal (timeout, 5xx, a server still loading) are retried
  with exponential backoff and jitter (tenacity), each attempt with a longer
  timeout; a refused connection moves on at once when a next link exists
  (nothing listens: waiting only delays the fallback; the breaker retests it).

Every failed attempt and skipped link is recorded (which link, error type,
message, attempt, seconds) in the step's result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cache import MISSING, ResponseCache
from .errors import (  # noqa: F401 - raised here, defined with the tree
    BackendError,
    BackendUnreachable,
    ChainExhausted,
    ConnectionRefused,
    ContextOverflow,
    LmflowError,
    ResourceShortage,
)
from .spec.model import Breaker, Guard, Link, ModelConfig, Policy

# ---------------------------------------------------------------- breaker


@dataclass
class _BreakerState:
    failures: int = 0
    opened_at: float | None = None
    tester: int | None = None  # the thread making the half-open test call


class BreakerBoard:
    """Circuit breakers for the run: one per server (it does not answer) and one per model on it
    (it times out or fails with 5xx).

    Shared by the run's worker threads, so every read and change holds one lock. Half-open means
    one test call, not one per thread: the first caller after the cool-down holds the test (it is
    told the breaker is closed), every other caller is told it is still open until the tester
    reports `success`, `failure`, or `release` (it gave up without a verdict). Ten threads retesting
    a dead server at once would cost ten timeouts for the one answer a single call gives.
    """

    def __init__(self, config: Breaker, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.states: dict[str, _BreakerState] = {}
        self._lock = threading.Lock()

    def open_reason(self, name: str) -> str | None:
        """Why calls to `name` are skipped now; None: call it (when half-open, this caller holds
        the one test call, and must end it with success, failure or release)."""
        me = threading.get_ident()
        with self._lock:
            state = self.states.get(name)
            if state is None or state.opened_at is None:
                return None
            left = self.config.cooldown - (self.clock() - state.opened_at)
            if left > 0:
                return (f"circuit open after {state.failures} consecutive failures; skipped for "
                        f"{left:.1f}s more (breaker.cooldown)")
            if state.tester is None or state.tester == me:
                state.tester = me  # half-open: this call tests it
                return None
            return (f"circuit half-open after {state.failures} consecutive failures; another call "
                    "is testing it, skipped until that call ends (breaker.cooldown)")

    def failure(self, name: str) -> None:
        with self._lock:
            state = self.states.setdefault(name, _BreakerState())
            state.failures += 1
            if state.failures >= self.config.failures:
                state.opened_at = self.clock()
            if state.tester == threading.get_ident():
                state.tester = None

    def success(self, name: str) -> None:
        with self._lock:
            self.states[name] = _BreakerState()

    def release(self, name: str) -> None:
        """End this thread's half-open test of `name` without a verdict (the call was skipped,
        or failed in a way the breaker does not count): the next caller tests it."""
        with self._lock:
            state = self.states.get(name)
            if state is not None and state.tester == threading.get_ident():
                state.tester = None


# ---------------------------------------------------------------- guard


def _idle_share(before: Any, after: Any) -> float | None:
    """Idle share of all CPUs between two `psutil.cpu_times()` readings (None: no tick between).

    The same arithmetic as psutil's cpu_percent: guest time is already in user time, and iowait
    is idle."""
    delta = {name: max(0.0, getattr(after, name) - getattr(before, name)) for name in after._fields}
    total = sum(delta.values()) - delta.get("guest", 0.0) - delta.get("guest_nice", 0.0)
    if total <= 0:
        return None
    return min(1.0, (delta["idle"] + delta.get("iowait", 0.0)) / total)


class ResourceGuard:
    """Free memory and idle CPU against the spec's thresholds (psutil).

    Idle CPU is measured since the guard's previous measure, whichever thread took it. Not with
    `psutil.cpu_percent(interval=None)`: it is safe from several threads, but psutil (7.x) keeps
    its previous reading per thread id, so a worker thread's first call compares two readings
    taken a microsecond apart and says 100% idle (or uses a stale one of a reused thread id).
    The guard keeps one baseline under a lock instead, and takes a new measure only after
    `MIN_WINDOW` seconds (shorter windows are jiffy noise): readings closer together than that
    get the previous measure.
    """

    MIN_WINDOW = 0.1

    def __init__(self, config: Guard, sleep: Callable[[float], None] = time.sleep):
        import psutil

        self.config = config
        self.sleep = sleep
        self._psutil = psutil
        self._lock = threading.Lock()
        self._cpu_before = psutil.cpu_times()  # the first reading only starts the measure
        self._cpu_read_at = time.monotonic()
        self._idle: float | None = None  # the last full window's measure

    def _cpu_idle(self) -> float:
        with self._lock:
            now, after = time.monotonic(), self._psutil.cpu_times()
            idle = _idle_share(self._cpu_before, after)
            if now - self._cpu_read_at >= self.MIN_WINDOW:
                self._cpu_before, self._cpu_read_at = after, now
                self._idle = self._idle if idle is None else idle
            elif self._idle is None:  # before the first full window: what there is
                return 1.0 if idle is None else idle  # no tick yet: nothing says it is busy
            return 1.0 if self._idle is None else self._idle

    def shortage(self) -> str | None:
        """What is short now, or None."""
        limit = self.config.min_free_memory
        if limit is not None:
            free = self._psutil.virtual_memory().available
            if free < limit:
                return (f"free memory {free / 2**30:.1f} GiB is below guard.min_free_memory "
                        f"{limit / 2**30:.1f} GiB")
        idle_limit = self.config.min_cpu_idle
        if idle_limit is not None:
            idle = self._cpu_idle()
            if idle < idle_limit:
                return f"idle CPU {idle:.0%} is below guard.min_cpu_idle {idle_limit:.0%}"
        return None

    def check(self, target: str) -> tuple[str, str] | None:
        """(decision, reason) when `target` must not be tried now; waits first if told to."""
        reason = self.shortage()
        if reason is None:
            return None
        if self.config.action == "fail":
            raise ResourceShortage(f"resource guard: {reason}; not trying {target} (free resources, "
                                   "or lower the guard's threshold, or set guard.action: fallback)")
        if self.config.action == "wait":
            deadline = time.monotonic() + self.config.wait
            while time.monotonic() < deadline:
                self.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                reason = self.shortage()
                if reason is None:
                    return None
            return "waited", f"waited {self.config.wait:g}s, still {reason}"
        return "fallback", reason


# ---------------------------------------------------------------- chain


@dataclass
class Answer:
    value: Any
    meta: dict[str, Any] = field(default_factory=dict)


def _heals(exc: BaseException) -> bool:
    return bool(getattr(exc, "retryable", False))


class Resilience:
    """What a run shares between its steps: breakers, the guard and the response cache.

    Steps and map items call `run_chain` from several worker threads at once: the breakers,
    the guard and the cache lock their own state, and the fallback count has its lock here.
    """

    def __init__(self, breaker: Breaker, guard: Guard | None, cache: ResponseCache | None,
                 sleep: Callable[[float], None] = time.sleep):
        self.breakers = BreakerBoard(breaker)
        self.guard = ResourceGuard(guard, sleep) if guard else None
        self.cache = cache
        self.sleep = sleep
        self.fallbacks = 0  # answers that did not come from the first link
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def run_chain(self, links: list[Link], models: dict[str, ModelConfig], policy: Policy, *,
                  ask: Callable[[str, float], Answer],
                  compute: Callable[[Link, list[dict[str, Any]]], Any],
                  cache_key: Callable[[str], str | None] = lambda alias: None,
                  cache_ttl: float | None = None) -> Answer:
        """The first answer a link gives, with meta saying which link answered and what failed."""
        errors: list[dict[str, Any]] = []
        needed: int | None = None  # tokens a context overflow reported

        def skip(index: int, link: Link, error_type: str, message: str) -> None:
            errors.append({"link": index, "target": link.describe(), "error_type": error_type,
                           "message": message, "attempt": None, "seconds": 0.0})

        for index, link in enumerate(links):
            has_next = index + 1 < len(links)
            started = time.perf_counter()
            if link.kind != "model":
                try:
                    value = compute(link, errors)
                except LmflowError as exc:
                    errors.append({"link": index, "target": link.describe(), "error_type": type(exc).__name__,
                                   "message": str(exc), "attempt": 1,
                                   "seconds": round(time.perf_counter() - started, 3)})
                    continue
                return self._answered(Answer(value), index, link, errors)
            model = models[link.target]
            key = cache_key(link.target) if self.cache is not None else None
            if key is not None:
                cached = self.cache.get(key)  # type: ignore[union-attr]
                if cached is not MISSING:
                    answer = Answer(cached["output"], {**cached["meta"], "cache": "hit"})
                    return self._answered(answer, index, link, errors)
            # a server that does not answer trips every model on it; a model that fails trips itself
            server, name = f"server {model.server}", f"{model.server}/{model.key}"
            reason = self.breakers.open_reason(server) or self.breakers.open_reason(name)
            try:
                if reason:
                    skip(index, link, "CircuitOpen", reason)
                    continue
                if needed and isinstance(model.context_length, int) and model.context_length < needed:
                    skip(index, link, "ContextOverflow", f"holds {model.context_length} tokens, "
                         f"the prompt needs {needed}")
                    continue
                if self.guard is not None and has_next:
                    decision = self.guard.check(link.describe())
                    if decision:
                        skip(index, link, "ResourceGuard", decision[1])
                        continue
                try:
                    answer = self._attempts(link, index, policy, ask, errors, fail_fast=has_next)
                except LmflowError as exc:
                    if _heals(exc):  # the breaker counts calls that gave up, not each attempt
                        self.breakers.failure(server if isinstance(exc, BackendUnreachable) else name)
                    if isinstance(exc, ContextOverflow):
                        needed = exc.n_prompt or needed
                    if not has_next:
                        raise self._final(exc, errors, links) from None
                    continue
                self.breakers.success(server)
                self.breakers.success(name)
            finally:
                # a half-open test this call held without a verdict (it skipped the link, or failed
                # in a way the breaker does not count) passes to the next caller
                self.breakers.release(server)
                self.breakers.release(name)
            if key is not None:
                self.cache.set(key, {"output": answer.value, "meta": answer.meta}, cache_ttl)  # type: ignore[union-attr]
                answer.meta["cache"] = "miss"
            return self._answered(answer, index, link, errors)
        raise ChainExhausted(errors, len(links))

    def _final(self, exc: LmflowError, errors: list[dict[str, Any]], links: list[Link]) -> LmflowError:
        """A one-link chain fails with its own error (and its attempts); longer ones list every link."""
        if len(links) == 1:
            exc.attempts = sum(1 for e in errors if e.get("attempt"))  # type: ignore[attr-defined]
            exc.errors = errors  # type: ignore[attr-defined]
            return exc
        return ChainExhausted(errors, len(links))

    def _answered(self, answer: Answer, index: int, link: Link, errors: list[dict[str, Any]]) -> Answer:
        if index:
            with self._lock:  # `+=` is a read and a write: two threads could count one
                self.fallbacks += 1
        answer.meta.update(answered_by={"link": index, "target": link.describe()}, errors=errors)
        return answer

    def _attempts(self, link: Link, index: int, policy: Policy,
                  ask: Callable[[str, float], Answer], errors: list[dict[str, Any]],
                  fail_fast: bool) -> Answer:
        """Call one model link with retries (tenacity) for failures that can heal."""
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

        def worth_retrying(exc: BaseException) -> bool:
            if fail_fast and isinstance(exc, ConnectionRefused):
                return False  # nothing listens: fall back now, the breaker retests it later
            return _heals(exc)

        retrying = Retrying(
            stop=stop_after_attempt(policy.retries + 1),
            wait=wait_exponential_jitter(initial=policy.retry_delay, exp_base=policy.backoff,
                                         max=max(policy.retry_delay * policy.backoff ** policy.retries, 0.0),
                                         jitter=policy.retry_delay / 2),
            retry=retry_if_exception(worth_retrying), reraise=True, sleep=self.sleep)
        answer: Answer | None = None
        number = 0
        # tenacity's loop: a failed attempt is swallowed by `with attempt` and either tried again
        # or re-raised by the next iteration; the loop ends after a success
        for attempt in retrying:
            number = attempt.retry_state.attempt_number
            started = time.perf_counter()
            with attempt:
                try:
                    answer = ask(link.target, policy.attempt_timeout(number))
                except LmflowError as exc:
                    errors.append({"link": index, "target": link.describe(), "error_type": type(exc).__name__,
                                   "message": str(exc), "attempt": number,
                                   "seconds": round(time.perf_counter() - started, 3)})
                    raise
        assert answer is not None
        answer.meta["attempts"] = number
        return answer
