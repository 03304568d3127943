"""Cost and error of the context probe vs. the naive strategies it replaces.

On the LM Studio-compatible test server, configured with known limits
(declared > loadable > working), compare:
  lmflow      bisection from the minimum to the declared maximum with read-back
              (clamping fails),
              then pass-key retrieval at start/middle/end, bisected on fill
  linear      load at every multiple of the granularity until one fails;
              trusts the size it asked for; "works" = a tiny prompt answers
  tiny-bisect bisection of loads with no read-back (a clamped load passes) and
              a tiny "2+2" prompt as the working check (the LMStrix way)
Targets: loadable maximum in at most ceil(log2(range/granularity)) + 3 loads;
working maximum within one granularity of the truth, where tiny-bisect is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRANULARITY = 1024
CASES = [  # key, declared, loadable, clamp, working
    ("case-a", 8192, 6000, False, 3000),
    ("case-b", 16384, 10000, True, 5000),
]


def server(config: Path) -> tuple[subprocess.Popen, str]:
    lmflow = Path(sys.executable).parent / "lmflow"
    proc = subprocess.Popen([str(lmflow), "testing", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


class Counting:
    """Counts a backend's loads and inference calls."""

    def __init__(self, backend):
        self.backend, self.loads, self.calls = backend, 0, 0
        real_load, real_chat = backend.load, backend.chat

        def load(model):
            self.loads += 1
            return real_load(model)

        def chat(request):
            self.calls += 1
            return real_chat(request)

        backend.load, backend.chat = load, chat


def lmflow_probe(backend, model, declared):
    from lmflow.probe import probe_loadable, probe_working

    report = probe_loadable(backend, model, maximum=declared, granularity=GRANULARITY, fresh=True)
    working, _ = probe_working(backend, model, context_length=report.loadable_max, granularity=GRANULARITY)
    return report.loadable_max, working


def tiny_prompt_works(backend, model) -> bool:
    from lmflow.backends.base import ChatRequest
    from lmflow.errors import BackendError

    try:
        backend.chat(ChatRequest(model=model, messages=[{"role": "user", "content": "2+2="}],
                                 sampling={"max_tokens": 4}))
        return True
    except BackendError:
        return False


def load_ok(backend, model, size, read_back: bool) -> bool:
    from lmflow.errors import BackendError

    sized = dataclasses.replace(model, context_length=size)
    try:
        backend.unload(sized)
        info = backend.load(sized)
    except BackendError:
        return False
    ok = (info.loaded_context_length == size) if read_back else True
    return ok and tiny_prompt_works(backend, sized) if ok else False


def linear(backend, model, declared):
    best = None
    for size in range(GRANULARITY, declared + 1, GRANULARITY):
        if not load_ok(backend, model, size, read_back=False):
            break
        best = size
    backend.unload(model)
    return best, best  # the tiny prompt "works" wherever it loads


def tiny_bisect(backend, model, declared):
    low, high, best = GRANULARITY, declared, None
    while low <= high:
        middle = (low + high) // 2 // GRANULARITY * GRANULARITY or GRANULARITY
        if load_ok(backend, model, middle, read_back=False):
            best, low = middle, middle + GRANULARITY
        else:
            high = middle - GRANULARITY
    backend.unload(model)
    return best, best


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LMFLOW_HOME"] = str(Path(tmp) / "home")
        from lmflow.backends.lmstudio import LMStudioBackend
        from lmflow.spec.model import ModelConfig, ServerConfig

        config = Path(tmp) / "cfg.yaml"
        config.write_text("models:\n" + "".join(
            f"  - key: {key}\n    file: smollm2-135m-instruct\n    max_context_length: {declared}\n"
            f"    loadable_context_length: {loadable}\n    clamp: {str(clamp).lower()}\n"
            f"    working_context_length: {working}\n    answers: retriever\n"
            for key, declared, loadable, clamp, working in CASES))
        proc, url = server(config)
        try:
            print(f"test server {url}, granularity {GRANULARITY}")
            print(f"{'case':<8} {'strategy':<12} {'loads':>5} {'calls':>5} {'seconds':>8} "
                  f"{'loadable':>9} {'(truth)':>8} {'working':>8} {'(truth)':>8}  verdict")
            for key, declared, loadable, _clamp, working in CASES:
                bound = math.ceil(math.log2((declared - GRANULARITY) / GRANULARITY)) + 3
                for name, strategy in (("lmflow", lmflow_probe), ("linear", linear),
                                       ("tiny-bisect", tiny_bisect)):
                    backend = LMStudioBackend(ServerConfig(name="b", backend="lmstudio", url=url))
                    counting = Counting(backend)
                    started = time.perf_counter()
                    found_load, found_work = strategy(backend, ModelConfig(alias="m", key=key), declared)
                    seconds = time.perf_counter() - started
                    backend.close()
                    load_ok_ = found_load is not None and 0 <= loadable - found_load < GRANULARITY
                    work_ok = found_work is not None and 0 <= working - found_work < GRANULARITY
                    verdict = ("right" if load_ok_ and work_ok else
                               f"WRONG ({'loadable' if not load_ok_ else ''}"
                               f"{' ' if not load_ok_ and not work_ok else ''}"
                               f"{'working' if not work_ok else ''})")
                    if name == "lmflow":
                        verdict += f", {counting.loads} loads vs bound {bound} + 1 working load"
                    print(f"{key:<8} {name:<12} {counting.loads:>5} {counting.calls:>5} {seconds:>8.2f} "
                          f"{found_load!s:>9} {loadable:>8} {found_work!s:>8} {working:>8}  {verdict}")
        finally:
            proc.terminate()
            proc.wait(20)


if __name__ == "__main__":
    main()
