"""Fallback, breaker and response cache costs, through the real prompt step on a real llama-server.

(1) Time to a fallback answer when the primary is down (connection refused),
    on top of the fallback's own time (the same question asked of the
    fallback directly, in the same run). Targets: under 100 ms with the
    breaker closed (the refused call happens), under 5 ms with it open.
(2) Response cache: hit latency (target under 2 ms), and a repeated workload
    (20 questions asked 3 times) with the cache on vs off.
(3) 100 requests with 30% injected primary failures (503s and connections
    reset mid-request, from an httpx transport in front of the real server,
    seeded; retries 2 with 50 ms backoff, the default breaker),
    chain = primary -> plain-code heuristic: success rate (target 100%) and
    total time vs the same 100 requests with no failures.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROUNDS = 15
KEY = "smollm2-135m-instruct"


class Faults(httpx.BaseTransport):
    """A seam in front of the real server: fails a share of chat requests (seeded)."""

    def __init__(self, rate: float, seed: int = 1):
        self.inner = httpx.HTTPTransport()
        self.rate = rate
        self.random = random.Random(seed)
        self.injected = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions") and self.random.random() < self.rate:
            self.injected += 1
            if self.random.random() < 0.5:
                return httpx.Response(503, json={"error": {"message": "injected: loading"}})
            raise httpx.ReadError("injected: connection reset by peer", request=request)
        return self.inner.handle_request(request)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LMFLOW_HOME"] = str(Path(tmp) / "home")
        from lmflow.backends.local import LocalBackend, free_port
        from lmflow.backends.openai import OpenAIBackend
        from lmflow.cache import ResponseCache
        from lmflow.resilience import Resilience
        from lmflow.spec.model import Breaker, Link, ModelConfig, Policy, ResponseCacheConfig, ServerConfig
        from lmflow.steps.base import FixedModels, StepContext
        from lmflow.steps.prompt import PromptStep

        spec_dir = Path(tmp)
        (spec_dir / "heuristics.py").write_text("def guess(request):\n    return 'heuristic answer'\n")
        local = LocalBackend(ServerConfig(name="default"))
        smol = ModelConfig(alias="smol", key=KEY, context_length=1024)
        local.load(smol)
        dead = OpenAIBackend(ServerConfig(name="down", backend="openai",
                                          url=f"http://127.0.0.1:{free_port()}"))
        step = PromptStep()
        policy = Policy(retries=2, retry_delay=0.05, timeout=60)

        def context(models: dict[str, ModelConfig], backends: dict[str, Any], resilience: Resilience,
                    cache: ResponseCacheConfig | None = None) -> StepContext:
            session = FixedModels({alias: (backends[alias], model) for alias, model in models.items()},
                                  resilience=resilience, response_cache=cache)
            return StepContext(step_id="bench", spec_dir=spec_dir, session=session, policy=policy)

        def ask(ctx: StepContext, alias: str, text: str = "Say yes.", **extra: Any) -> Any:
            return step.run({"model": alias, "user": text, "max_tokens": 2, "temperature": 0, **extra}, ctx)

        try:
            # (1) a dead primary
            primary = ModelConfig(alias="primary", key="big", server="down",
                                  fallback=(Link("model", "smol"),))
            models = {"primary": primary, "smol": smol}
            backends = {"primary": dead, "smol": local}
            for _ in range(3):  # warm up the engine
                ask(context(models, backends, Resilience(Breaker(), None, None)), "smol")
            direct, closed, opened = [], [], []
            open_board = Resilience(Breaker(failures=1, cooldown=3600), None, None)
            ask(context(models, backends, open_board), "primary")  # opens its breaker
            for _ in range(ROUNDS):
                t = time.perf_counter()
                ask(context(models, backends, Resilience(Breaker(), None, None)), "smol")
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                result = ask(context(models, backends, Resilience(Breaker(), None, None)), "primary")
                closed.append(time.perf_counter() - t)
                assert result.meta["answered_by"]["link"] == 1
                t = time.perf_counter()
                result = ask(context(models, backends, open_board), "primary")
                opened.append(time.perf_counter() - t)
                assert result.meta["errors"][0]["error_type"] == "CircuitOpen"
            print("(1) time to an answer, primary down (connection refused), medians of", ROUNDS)
            print(f"    fallback asked directly:      {median_ms(direct):7.1f} ms")
            print(f"    via the chain, breaker closed: {median_ms(closed):7.1f} ms  "
                  f"(+{median_ms(closed) - median_ms(direct):.1f} ms, target < 100)")
            print(f"    via the chain, breaker open:   {median_ms(opened):7.1f} ms  "
                  f"(+{median_ms(opened) - median_ms(direct):.1f} ms, target < 5)")
            # the same with a static value as the fallback: its own time is ~0, so what is measured
            # is the chain's cost alone (the refused call, or the breaker's skip)
            static = ModelConfig(alias="primary", key="big", server="down", fallback=(Link("value", "v"),))
            models_v = {"primary": static}
            backends_v = {"primary": dead}
            open_v = Resilience(Breaker(failures=1, cooldown=3600), None, None)
            ask(context(models_v, backends_v, open_v), "primary")
            closed_v, opened_v = [], []
            for _ in range(ROUNDS * 4):
                t = time.perf_counter()
                ask(context(models_v, backends_v, Resilience(Breaker(), None, None)), "primary")
                closed_v.append(time.perf_counter() - t)
                t = time.perf_counter()
                ask(context(models_v, backends_v, open_v), "primary")
                opened_v.append(time.perf_counter() - t)
            print(f"    chain cost alone (fallback = a static value): breaker closed "
                  f"{median_ms(closed_v):.2f} ms, open {median_ms(opened_v):.3f} ms")

            # (2) the response cache
            cache_config = ResponseCacheConfig(directory=str(spec_dir / "cache"))
            cached = Resilience(Breaker(), None, ResponseCache(cache_config.directory))
            questions = [f"Say the number {i}." for i in range(20)]
            ctx_on = context({"smol": smol}, {"smol": local}, cached, cache_config)
            ctx_off = context({"smol": smol}, {"smol": local}, Resilience(Breaker(), None, None))
            t = time.perf_counter()
            for _ in range(3):
                for q in questions:
                    ask(ctx_off, "smol", q)
            off = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(3):
                for q in questions:
                    ask(ctx_on, "smol", q)
            on = time.perf_counter() - t
            hits = []
            for q in questions:
                started = time.perf_counter()
                result = ask(ctx_on, "smol", q)
                hits.append(time.perf_counter() - started)
                assert result.meta["cache"] == "hit"
            raw = cached.cache.stats.hit_seconds  # type: ignore[union-attr]
            print("(2) response cache")
            print(f"    hit through the prompt step: median {median_ms(hits):.2f} ms, "
                  f"max {max(hits) * 1000:.2f} ms (target < 2); diskcache get alone "
                  f"{median_ms(raw):.3f} ms")
            print(f"    60 requests (20 questions x 3): cache off {off:.2f} s, on {on:.2f} s "
                  f"-> {off / on:.1f}x faster")
            cached.close()

            # (3) 100 requests, 30% injected primary failures, heuristic last link
            def workload(rate: float) -> tuple[float, dict[str, int], int]:
                faults = Faults(rate)
                flaky = OpenAIBackend(ServerConfig(name="flaky", backend="openai",
                                                   url=local.clients["smol"].url), transport=faults)
                model = ModelConfig(alias="flaky", key=KEY, server="flaky",
                                    fallback=(Link("python", "heuristics:guess"),))
                resilience = Resilience(Breaker(), None, None)
                ctx = context({"flaky": model}, {"flaky": flaky}, resilience)
                answered: dict[str, int] = {}
                started = time.perf_counter()
                for i in range(100):
                    result = ask(ctx, "flaky", f"Say the number {i}.")
                    target = result.meta["answered_by"]["target"]
                    answered[target] = answered.get(target, 0) + 1
                seconds = time.perf_counter() - started
                flaky.close()
                return seconds, answered, faults.injected

            clean, clean_by, _ = workload(0.0)
            faulty, faulty_by, injected = workload(0.3)
            print("(3) 100 requests, primary -> heuristic")
            print(f"    no failures:          {clean:.2f} s, answered by {clean_by}")
            print(f"    30% injected ({injected} faults on {100 + injected}+ calls): {faulty:.2f} s "
                  f"({faulty / clean:.2f}x), answered by {faulty_by}, success "
                  f"{sum(faulty_by.values())}/100")
        finally:
            local.close()
            dead.close()


if __name__ == "__main__":
    main()
