"""The Backend seam: steps ask a backend to chat/load/unload and never know which server answers."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import MalformedAnswer
from ..spec.model import ModelConfig, ServerConfig

T = TypeVar("T")


def checked(url: str | None, fn: Callable[[], T]) -> T:
    """`fn()`, with an answer of an unexpected shape (a missing field, a list where an object was
    promised: KeyError, TypeError...) turned into MalformedAnswer, so fallbacks and breakers apply
    and no command prints a traceback."""
    try:
        return fn()
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise MalformedAnswer(
            f"{url or 'the server'} answered in a shape lmflow does not expect ({type(exc).__name__}: "
            f"{exc}); if its answers look right, this is an lmflow bug: please report it",
            url=url) from exc



@dataclass
class ChatRequest:
    model: ModelConfig
    messages: list[dict[str, Any]]
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, seed, stop
    response_schema: dict[str, Any] | None = None
    timeout: float = 120.0
    stream: bool = False  # stream the answer to measure the time to its first token


@dataclass
class ChatResponse:
    text: str
    model: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0
    first_token_seconds: float | None = None  # only for streamed answers
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ModelInfo:
    key: str
    loaded: bool | None = None
    max_context_length: int | None = None
    loaded_context_length: int | None = None
    instance_id: str | None = None
    load_seconds: float | None = None


class Slots:
    """Requests in flight to one server, and to each model on it, at most (`parallel`).

    Every chat of a backend holds a server slot and a slot of its model, so
    `servers.X.parallel: 4` is a bound across all steps and items of a run. `gate`, when
    set (by the compiler, for a server that runs share), is held inside those: a slot of
    a limit shared with every other run and worker (a Prefect global concurrency limit).
    """

    def __init__(self, server_limit: int | None):
        self.server = threading.BoundedSemaphore(server_limit) if server_limit else None
        self.models: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self.gate: Callable[[], AbstractContextManager[Any]] | None = None

    @contextmanager
    def hold(self, model: ModelConfig) -> Iterator[None]:
        limit = None
        if model.parallel:
            with self._lock:
                limit = self.models.setdefault(model.alias, threading.BoundedSemaphore(model.parallel))
        # the shared gate last: a run asks the Prefect API only for slots it can use right away
        with self.server or nullcontext(), limit or nullcontext(), \
                self.gate() if self.gate else nullcontext():
            yield


#: the options of a server that someone else runs, read by the lmstudio and openai backends
REMOTE_SERVER_OPTIONS: dict[str, dict[str, Any]] = {
    "url": {"type": "string", "pattern": "^(https?://|\\$\\{\\{)",
            "description": "Base URL of the running server; may be ${{ params.NAME }}."},
    "api_key_env": {"type": "string",
                    "description": "Name of the environment variable holding the API key/token."},
    "start": {"type": "string", "description": "Shell command that starts the server when it is down."},
    "stop": {"type": "string", "description": (
        "Shell command that stops the server, run at the end of a run whose start command left it "
        "running as a daemon (default: `lms server stop` after `lms server start`). A start command "
        "that stays in the foreground is stopped by PID instead.")},
    "max_restarts": {"type": "integer", "minimum": 0, "description": (
        "How often lmflow may restart a server that died during a run (needs start).")},
    "shared_limit": {"type": "boolean", "description": (
        "Hold a Prefect global concurrency limit named after this server (size: parallel, else 4) "
        "around every model call, shared by every run and worker (costs ~0.1 s per call); default "
        "false (one run's own requests are already bounded by parallel).")},
}


class Backend(ABC):
    """A model server. What it can do is declared as class attributes; steps, validation and the
    CLI read them, never the backend's name. Registered like a step kind (`lmflow.backends`)."""

    #: the name a spec gives as `server.backend`
    kind: str
    #: one line on what it talks to (the schema's description of `backend`)
    summary: str = ""
    #: JSON Schema of each server option it reads beyond the common ones (backend, parallel,
    #: startup_timeout); merged into the spec's schema, where the other backends' options are
    #: refused for it. Built-in options become `ServerConfig` fields, any other `config.options`.
    server_options: dict[str, dict[str, Any]] = {}
    #: the server's URL when a spec gives none; None: a spec must give one (unless owns_server)
    default_url: str | None = None
    #: whether the backend can load and unload models itself
    manages_models: bool = False
    #: lmflow starts this server itself and stops it with the run: its URL (a new port each time)
    #: is in no cache key or probe record, what it loaded dies with it (nothing for a later run to
    #: release, `keep_loaded` cannot outlive the run) and no other run can share it
    owns_server: bool = False
    #: the model options beyond key/context_length/parallel that its loads honour (LM Studio's
    #: gpu, ttl, identifier)
    load_options: frozenset[str] = frozenset()
    #: what the terminal says when a run first needs the server (None: nothing worth saying)
    starting_message: str | None = None

    def __init__(self, config: ServerConfig):
        self.config = config
        self.slots = Slots(config.parallel)

    @classmethod
    def create(cls, config: ServerConfig, spec_dir: Path | None = None) -> Backend:
        """The backend for a server of a spec in `spec_dir` (paths in its options are relative to it)."""
        return cls(config)

    @classmethod
    def model_problem(cls, key: str, path: str | None) -> tuple[str, str] | None:
        """What is wrong with a model declared on a server of this backend, as (message, hint);
        None when nothing is (checked by `lmflow validate`)."""
        return None

    @property
    def url(self) -> str | None:
        return self.config.url

    @abstractmethod
    def health(self) -> bool:
        """True when the server answers requests now."""

    @abstractmethod
    def list_models(self) -> list[ModelInfo]: ...

    @abstractmethod
    def chat(self, request: ChatRequest) -> ChatResponse:
        """Answer one request; implementations hold `self.slots.hold(request.model)` while they ask."""

    def ensure(self) -> dict[str, Any]:
        """Make sure the server is up (start it if the config says how); say what was done."""
        from ..errors import BackendUnreachable

        if not self.health():
            raise BackendUnreachable(f"no server answers at {self.url}", url=self.url)
        return {"url": self.url, "was_running": True, "started": False, "seconds": 0.0}

    def fingerprint(self, model: ModelConfig) -> dict[str, Any]:
        """What, beyond the model key and its options, changes how this model behaves here: the
        server's version and the model's variant, as far as the server tells (the probe registry
        keys on it, so an upgrade means a new probe)."""
        return {}

    def set_listener(self, listener: Any) -> None:  # noqa: B027 - optional hook
        """Where the backend reports what it did on its own (restarts, warnings)."""

    def load(self, model: ModelConfig) -> ModelInfo:
        raise NotImplementedError(f"the {self.kind} backend does not load models")

    def unload(self, model: ModelConfig, *, every: bool = False) -> list[str]:
        """Unload the instance this backend loaded for the model; with `every`, every instance of
        its key on the server (another client's too). Returns the instances unloaded."""
        raise NotImplementedError(f"the {self.kind} backend does not unload models")

    def find_loaded(self, model: ModelConfig) -> ModelInfo | None:
        """An instance already loaded as the model declares it, which chats then use (None: load one)."""
        return None

    @property
    def address(self) -> str:
        """Where the server is, the same across restarts (probe records are keyed by it)."""
        return self.url or self.kind

    @property
    def probe_command(self) -> str:
        """The `lmflow probe` options that reach this server."""
        return f"--server {self.url}"

    def count_tokens(self, model: ModelConfig, text: str) -> int | None:
        """The server's own count of the tokens of `text` for the model (None: it cannot say)."""
        return None

    def unload_instance(self, instance_id: str) -> bool:
        """Unload one instance by id, whoever loaded it; False when it is not loaded (a backend
        whose models die with it has none left over)."""
        return False

    def loaded_instances(self) -> list[tuple[str, str]]:
        """Every instance loaded on the server, as (model key, instance id); [] where there are none
        to speak of (a managed engine's model dies with it)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections and stop whatever this backend started."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
