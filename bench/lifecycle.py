"""Model lifecycle through lmflow vs. direct REST calls, on the LM Studio-compatible test server.

(1) load / unload / reload: the same operations as raw httpx REST calls and
    through lmflow's LMStudioBackend (which also reads the context back and
    keeps its bookkeeping); overhead per operation = lmflow - direct.
    Target: under 50 ms on top of the server's own time.
(2) a server killed mid-run: time from the failed request to the answer after
    lmflow restarted the server (start command) and reloaded the model.
    Target: under 10 s plus the model's load time.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROUNDS = 7
KEY = "smollm2-135m-instruct"


def start_server(port: int, config: Path) -> tuple[subprocess.Popen, str]:
    lmflow = Path(sys.executable).parent / "lmflow"
    proc = subprocess.Popen([str(lmflow), "testing", "serve", "--port", str(port), "--config", str(config)],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LMFLOW_HOME"] = str(Path(tmp) / "home")
        from lmflow.backends.base import ChatRequest
        from lmflow.backends.lmstudio import LMStudioBackend
        from lmflow.backends.local import free_port
        from lmflow.spec.model import ModelConfig, ServerConfig

        config = Path(tmp) / "cfg.yaml"
        config.write_text(f"models:\n  - key: {KEY}\n")
        port = free_port()
        proc, url = start_server(port, config)
        model = ModelConfig(alias="m", key=KEY, context_length=1024)
        try:
            backend = LMStudioBackend(ServerConfig(
                name="default", backend="lmstudio", url=url,
                start=f"{Path(sys.executable).parent / 'lmflow'} testing serve --port {port} "
                      f"--config {config}", max_restarts=1))
            direct = {"load": [], "unload": []}
            ours = {"load": [], "unload": [], "reload": []}
            with httpx.Client(base_url=url, timeout=120) as http:
                for i in range(ROUNDS + 1):  # round 0 warms the file cache, not counted
                    t = time.perf_counter()
                    iid = http.post("/api/v1/models/load", json={"model": KEY, "context_length": 1024}
                                    ).json()["instance_id"]
                    load = time.perf_counter() - t
                    t = time.perf_counter()
                    http.post("/api/v1/models/unload", json={"instance_id": iid}).raise_for_status()
                    unload = time.perf_counter() - t
                    t = time.perf_counter()
                    backend.load(model)
                    our_load = time.perf_counter() - t
                    t = time.perf_counter()
                    backend.unload(model)
                    backend.load(model)
                    reload = time.perf_counter() - t
                    t = time.perf_counter()
                    backend.unload(model)
                    our_unload = time.perf_counter() - t
                    if i:
                        direct["load"].append(load)
                        direct["unload"].append(unload)
                        ours["load"].append(our_load)
                        ours["reload"].append(reload)
                        ours["unload"].append(our_unload)
            print(f"test server {url}, median of {ROUNDS} rounds, context 1024")
            print(f"{'operation':<10} {'direct REST':>12} {'lmflow':>10} {'overhead':>10}")
            for op in ("load", "unload"):
                d, o = statistics.median(direct[op]), statistics.median(ours[op])
                print(f"{op:<10} {d * 1000:>10.1f}ms {o * 1000:>8.1f}ms {(o - d) * 1000:>8.1f}ms")
            d = statistics.median(direct["load"]) + statistics.median(direct["unload"])
            o = statistics.median(ours["reload"])
            print(f"{'reload':<10} {d * 1000:>10.1f}ms {o * 1000:>8.1f}ms {(o - d) * 1000:>8.1f}ms")

            # (2) kill the server between two requests, measure until the next answer
            backend.load(model)
            request = ChatRequest(model=model, messages=[{"role": "user", "content": "hi"}],
                                  sampling={"max_tokens": 2})
            backend.chat(request)
            load_time = statistics.median(ours["load"])
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            t = time.perf_counter()
            backend.chat(request)
            recovered = time.perf_counter() - t
            restart = backend.supervisor.restarts[0]
            print(f"killed server -> answer after restart: {recovered:.2f}s (server up in "
                  f"{restart['seconds']:.2f}s, model load ~{load_time:.2f}s); target < 10s + load: "
                  f"{'met' if recovered < 10 + load_time else 'MISSED'}")
            backend.close()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)


if __name__ == "__main__":
    main()
