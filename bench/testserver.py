"""The LM Studio test server's own costs: start-up to first answer, and per-request overhead.

- Start-up: from launching `lmflow testing serve` to the first chat answer (the server
  starts, prints its URL, JIT-loads the bundled model into a llama-server child, answers),
  and the same split into "URL printed" and "first answer after the URL".
- Overhead: REQUESTS sequential one-token chat completions through the test server's
  `/v1/chat/completions` against the same requests sent straight to the llama-server child it
  relays to, interleaved (one of each in turn, so both see the same machine load). The
  overhead is the difference of the medians; the ratio is test server / direct.

Target: overhead under 5 ms per request. Prints each figure's median and range.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPEATS = 3  # start-ups
REQUESTS = 60  # per path, interleaved
LMFLOW = str(Path(sys.executable).parent / "lmflow")
CONFIG = "models:\n  - key: smollm2-135m-instruct\n"
BODY = {"model": "smollm2-135m-instruct", "max_tokens": 1, "temperature": 0,
        "messages": [{"role": "user", "content": "Say yes."}]}


def start(config: Path) -> tuple[subprocess.Popen, str, float]:
    began = time.perf_counter()
    proc = subprocess.Popen([LMFLOW, "testing", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"the test server did not start: {url!r}")
    return proc, url, began


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def child_url(proc: subprocess.Popen) -> str:
    """The URL of the llama-server child the test server relays to (its one loaded instance)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        for conn in child.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                return f"http://127.0.0.1:{conn.laddr.port}"
    raise RuntimeError("no llama-server child listens")


def show(label: str, values: list[float], unit: str = "s", scale: float = 1.0) -> float:
    median = statistics.median(values) * scale
    print(f"{label:<44} median {median:8.2f} {unit}  range {min(values) * scale:.2f}-"
          f"{max(values) * scale:.2f} {unit}")
    return median


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lmstudio.yaml"
        config.write_text(CONFIG)
        ups, urls, answers = [], [], []
        for _ in range(REPEATS):
            proc, url, began = start(config)
            try:
                printed = time.perf_counter()
                httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=120).raise_for_status()
                done = time.perf_counter()
                ups.append(done - began)
                urls.append(printed - began)
                answers.append(done - printed)
            finally:
                stop(proc)
        print(f"test server start-up, {REPEATS} starts (bundled SmolLM2-135M, JIT load on the first chat)")
        show("launch -> first answer", ups)
        show("launch -> URL printed", urls)
        show("URL printed -> first answer (JIT load)", answers)

        proc, url, _ = start(config)
        try:
            with httpx.Client(timeout=60) as http:
                http.post(f"{url}/v1/chat/completions", json=BODY).raise_for_status()  # loads
                direct_url = child_url(proc)
                via, direct = [], []
                for _ in range(REQUESTS):
                    for target, times in ((f"{url}/v1/chat/completions", via),
                                          (f"{direct_url}/v1/chat/completions", direct)):
                        began = time.perf_counter()
                        http.post(target, json=BODY).raise_for_status()
                        times.append(time.perf_counter() - began)
        finally:
            stop(proc)
        print(f"\nper request, {REQUESTS} one-token chat completions each, interleaved")
        through = show("through the test server", via, "ms", 1000)
        straight = show("straight to its llama-server child", direct, "ms", 1000)
        print(f"overhead (difference of medians): {through - straight:.2f} ms per request "
              f"(target < 5 ms); ratio test server / direct: {through / straight:.2f}x")


if __name__ == "__main__":
    main()
