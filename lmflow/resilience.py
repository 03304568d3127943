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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cache import MISSING, ResponseCache
from .errors import BackendError, BackendUnreachable, ConnectionRefused, ContextOverflow, LmflowError
from .spec.model import Breaker, Guard, Link, ModelConfig, Policy


class ChainExhausted(BackendError):
    """No link of a fallback chain gave an answer."""

    def __init__(self, errors: list[dict[str, Any]], links: int):
        self.errors = errors  # every attempt of every link (the message says why each link failed)
        last: dict[int, dict[str, Any]] = {}
        for error in errors:
            last[error["link"]] = error
        reasons = "; ".join(f"{e['target']}: {e['message']}" for e in last.values())
        if links == 1:
            super().__init__(f"{reasons} (declare a fallback to answer anyway)")
        else:
            super().__init__(f"all {links} links of the fallback chain failed: {reasons} "
                             "(add a python or value link at the end to always answer)")


class ResourceShortage(LmflowError):
    """The resource guard says no, and its action is fail."""

    exit_code = 3


# ---------------------------------------------------------------- breaker


@dataclass
class _BreakerState:
    failures: int = 0
    opened_at: float | None = None


class BreakerBoard:
    """Circuit breakers for the run: one per server (it does not answer) and one per model on it
    (it times out or fails with 5xx)."""

    def __init__(self, config: Breaker, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.states: dict[str, _BreakerState] = {}

    def open_reason(self, name: str) -> str | None:
        """Why calls to `name` are skipped now (None: closed, or half-open for one test call)."""
        state = self.states.get(name)
        if state is None or state.opened_at is None:
            return None
        left = self.config.cooldown - (self.clock() - state.opened_at)
        if left <= 0:
            return None  # half-open: the next call tests it
        return (f"circuit open after {state.failures} consecutive failures; skipped for "
                f"{left:.1f}s more (breaker.cooldown)")

    def failure(self, name: str) -> None:
        state = self.states.setdefault(name, _BreakerState())
        state.failures += 1
        if state.failures >= self.config.failures:
            state.opened_at = self.clock()

    def success(self, name: str) -> None:
        self.states[name] = _BreakerState()


# ---------------------------------------------------------------- guard


class ResourceGuard:
    """Free memory and idle CPU against the spec's thresholds (psutil)."""

    def __init__(self, config: Guard, sleep: Callable[[float], None] = time.sleep):
        import psutil

        self.config = config
        self.sleep = sleep
        self._psutil = psutil
        if config.min_cpu_idle is not None:
            psutil.cpu_percent(interval=None)  # the first reading only starts the measure

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
            idle = 1 - self._psutil.cpu_percent(interval=None) / 100
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
    """What a run shares between its steps: breakers, the guard and the response cache."""

    def __init__(self, breaker: Breaker, guard: Guard | None, cache: ResponseCache | None,
                 sleep: Callable[[float], None] = time.sleep):
        self.breakers = BreakerBoard(breaker)
        self.guard = ResourceGuard(guard, sleep) if guard else None
        self.cache = cache
        self.sleep = sleep
        self.fallbacks = 0  # answers that did not come from the first link

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
