"""lmflow: declarative pipelines for local LLM servers, run as Prefect flows.

Importing lmflow is light: Prefect is imported only when a run starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import LmflowError, Problem, SpecError, StepFailed
from .spec import Spec, load_spec, spec_schema, validate_files
from .steps import FixedModels, Session, Step, StepContext, StepResult, register

if TYPE_CHECKING:
    from .engine.records import RunResult

__version__ = "0.1.0"
__all__ = [
    "FixedModels", "LmflowError", "Problem", "RunResult", "Session", "Spec", "SpecError", "Step",
    "StepContext",
    "StepFailed", "StepResult", "load_spec", "register", "run", "spec_schema", "validate_files",
]


def run(spec_path: Any, params: dict[str, Any] | None = None, **options: Any) -> RunResult:
    """Validate, compile to a Prefect flow and run a spec: a path, or a `Spec` loaded with these
    params (see `lmflow.prefect.flow.run`)."""
    from contextlib import nullcontext

    from .prefect.server import configure_environment, temporary_server

    # spec errors cost nothing: no Prefect import yet; loaded once (validation imports its modules)
    spec = spec_path if isinstance(spec_path, Spec) else load_spec(spec_path, params)
    # Prefect reads its settings when it is imported: configure first
    choice = configure_environment(options.get("verbose", False))
    listener = options.get("listener")
    if choice.url is None and listener:
        listener("temporary_server_starting", {})
    with temporary_server() if choice.url is None else nullcontext():
        from .prefect.flow import run as _run

        return _run(spec, params, **options)


def __getattr__(name: str) -> Any:
    if name == "RunResult":
        from .engine.records import RunResult

        return RunResult
    raise AttributeError(name)
