"""Every error lmflow raises on purpose.

    LmflowError                      exit 1 unless a subclass says otherwise
    ├── SpecError                    exit 2: the spec (or a -p value) is wrong
    │     carries a list of Problem(file, line, col, path, message, hint)
    ├── StepFailed                   exit 1: a step failed after its retries
    ├── RunStopping                  the run is ending (Ctrl-C, SIGTERM, a failure): nothing new starts
    ├── RecordNotWritten             the run cannot write its journal or record (a full disk)
    ├── BackendError                 exit 3: talking to a model server failed
    │   ├── BackendUnreachable       retryable: connection refused/reset
    │   │   └── ConnectionRefused    nothing listens (a fallback is tried at once)
    │   ├── BackendTimeout           retryable: no answer within the timeout
    │   ├── BackendHTTPError         retryable only for 5xx
    │   │   └── ModelNotFound        the server does not know the model key
    │   ├── ContextOverflow          prompt larger than the loaded context
    │   ├── InvalidResponse          answer is not valid JSON / not the schema
    │   └── MalformedAnswer          the server broke its own API (a body not JSON, a bad chunk)
    ├── EngineError                  exit 3: the managed llama-server failed
    │   └── EngineNotInstalled       binary or model file missing
    └── PrefectServerError           exit 3: lmflow's Prefect server

Messages are built from structured fields and end with what to do about it.
The CLI (one place) turns them into text and an exit code.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LmflowError(Exception):
    """Root of lmflow's errors."""

    exit_code = 1
    #: whether trying the same thing again can succeed (connection, timeout, 5xx)
    retryable = False


@dataclass(frozen=True)
class Problem:
    """One problem found in a spec, with where it is and how to fix it."""

    file: str
    line: int | None
    col: int | None
    path: str
    message: str
    hint: str | None = None

    def render(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        text = f"{where}: {self.path or '<document>'}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class SpecError(LmflowError):
    """The spec is invalid; holds every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(
            problems, key=lambda p: (p.file, p.line or 0, p.col or 0, p.path, p.message)
        )
        super().__init__("\n".join(p.render() for p in self.problems))


@dataclass
class StepFailure:
    """Why a step failed, in a form that survives serialisation."""

    step: str
    error_type: str
    message: str
    attempts: int = 1
    retryable: bool = False
    extra: dict = field(default_factory=dict)


class StepFailed(LmflowError):
    """A step failed for good (after its retries)."""

    def __init__(self, failure: StepFailure):
        self.failure = failure
        attempts = f" after {failure.attempts} attempts" if failure.attempts > 1 else ""
        super().__init__(f"step '{failure.step}' failed{attempts}: {failure.message}")


class RunStopping(LmflowError):
    """The run is ending (Ctrl-C, SIGTERM, the flow failed): a unit still in flight starts nothing new,
    such as loading a model that the run's end has just unloaded."""


class RecordNotWritten(LmflowError):
    """A write under lmflow's home failed (a full disk): the run stops starting work it could not
    record, and says so once."""


class BackendError(LmflowError):
    """A model server could not give an answer."""

    exit_code = 3

    def __init__(self, message: str, *, url: str | None = None):
        self.url = url
        super().__init__(message)


class BackendUnreachable(BackendError):
    retryable = True


class ConnectionRefused(BackendUnreachable):
    """Nothing listens at the address (the server is not running)."""


class BackendTimeout(BackendError):
    retryable = True


class BackendHTTPError(BackendError):
    def __init__(self, message: str, *, url: str | None = None, status: int, body: str = ""):
        self.status = status
        self.body = body
        super().__init__(message, url=url)

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status >= 500


class ModelNotFound(BackendHTTPError):
    pass


class ContextOverflow(BackendError):
    def __init__(
        self, message: str, *, url: str | None = None, n_prompt: int | None, n_ctx: int | None
    ):
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx
        super().__init__(message, url=url)


class InvalidResponse(BackendError):
    pass


class MalformedAnswer(BackendError):
    """The server's answer is not what its API promises: a body that is not a JSON object, a stream
    chunk that does not parse, a missing field. Not retried (a server that does this once, such as
    a web page at server.url, does it again); a fallback chain moves on."""


class EngineError(LmflowError):
    """The managed llama-server could not be started or died."""

    exit_code = 3


class EngineNotInstalled(EngineError):
    pass


class PrefectServerError(LmflowError):
    exit_code = 3


def describe(exc: BaseException) -> str:
    """A one-line description for errors that are not ours (user code in python steps)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
