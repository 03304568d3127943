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
    │   ├── ChainExhausted           no link of a fallback chain answered
    │   └── WrongModel               the server answered with another model than asked
    ├── EngineError                  exit 3: the managed llama-server failed
    │   └── EngineNotInstalled       binary or model file missing
    ├── PrefectServerError           exit 3: lmflow's Prefect server
    ├── TemplateError                a `${{ }}` reference that cannot be parsed or resolved
    ├── ExpressionError              a bad `when:` or `until:` expression, with its offset
    ├── UserCodeError                a python step's, link's or loop's own code failed
    │   ├── UserCodeFailed           it raised (retryable)
    │   ├── UserCodeTimeout          it ran past the timeout
    │   └── UserCodeCancelled        the run ended while it ran
    ├── ResourceShortage             exit 3: the resource guard said no, and its action is fail
    ├── ServerDown                   exit 3: a model server is down and could not be restarted
    ├── ContextMismatch              a load applied another context length than asked
    ├── ProbeMissing                 `context_length: probed` with no (usable) probe record
    ├── DatasetError                 a foreach source that gives no list of items
    ├── LoopStopped                  the run stopped while a loop ran (its state is saved)
    ├── HistoryError                 a run that cannot be found or run again
    ├── DistributedError             a distributed map cannot run: no shared folder, no task worker
    ├── FailedElsewhere              a unit failed on a task worker (its failure as shaped there)
    └── DeployError                  exit 2: a deployment that cannot be made

TemplateError and ExpressionError are ValueErrors too. Messages are built from structured fields
and end with what to do about it.
The CLI (one place) turns them into text and an exit code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


class TemplateError(LmflowError, ValueError):
    """A reference (`${{ ... }}`) that cannot be parsed or resolved."""


class ExpressionError(LmflowError, ValueError):
    """A bad expression: `message`, and `offset`, the 0-based character offset in the text (or None)."""

    def __init__(self, message: str, offset: int | None = None):
        super().__init__(message)
        self.message = message
        self.offset = offset


# -- raised by one module each (defined here, so the whole tree is in one place) --------------


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


class HistoryError(LmflowError):
    """A run could not be found, or run again as asked."""


class DatasetError(LmflowError):
    """A foreach source that cannot give a list of items."""


class LoopStopped(LmflowError):
    """The run was stopped while the loop ran; its state is saved and a re-run resumes it."""


class DeployError(LmflowError):
    """A deployment could not be made (a bad schedule, no Prefect server, an unknown pool)."""

    exit_code = 2


class WrongModel(BackendError):
    """The server answered with another model than the one asked for."""


class ServerDown(LmflowError):
    """A model server is down and could not be (re)started with server.start."""

    exit_code = 3


class UserCodeError(LmflowError):
    """The user's function raised; its message says where."""


class UserCodeFailed(UserCodeError):
    """The function itself raised: retried like any failure that may heal (a flaky call inside)."""

    retryable = True


class UserCodeTimeout(UserCodeError):
    """The function did not return within the step's timeout: retried, like a backend timeout."""

    retryable = True


class UserCodeCancelled(UserCodeError):
    """The run ended (a failure elsewhere, Ctrl-C, SIGTERM) while the function still ran."""


class ContextMismatch(LmflowError):
    """The server loaded the model at another context length than the spec asked for."""


class ProbeMissing(LmflowError):
    """A spec asks for `context_length: probed` but nothing was probed for that model, or the probe
    found no size of the kind asked for (no working maximum)."""


class DistributedError(LmflowError):
    """A distributed map cannot run here: no shared folder, no task worker connected, a worker whose
    checkout holds another version of the spec."""


class FailedElsewhere(LmflowError):
    """A unit failed on a task worker; `failure` is its error as the worker shaped it (its type,
    message and attempts there), recorded as if it had failed here."""

    def __init__(self, failure: StepFailure):
        self.failure = failure
        super().__init__(failure.message)
