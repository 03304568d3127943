"""The Step abstraction: a kind name, an options schema, and one `run` method.

A step kind is one module. Built-in kinds are registered exactly like a
user's own: through the `lmflow.steps` entry-point group (see pyproject.toml),
or by calling `register()` before a spec is loaded.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from ..backends.base import Backend, ModelInfo
    from ..engine.unit import Lifecycle
    from ..errors import Problem
    from ..resilience import Resilience
    from ..spec.model import ModelConfig, Policy, ResponseCacheConfig, StepSpec


@dataclass(frozen=True)
class Holds:
    """What a kind that holds steps of its own (the loop's checkpoints) offers them, and the words
    the validator's messages use for them."""

    #: the template root its steps and its own conditions see (`loop`: `${{ loop.generation }}`)
    root: str
    #: the fields under that root
    fields: tuple[str, ...]
    #: what one list of its steps is called (`checkpoint`)
    group: str
    #: its options that `check_nested` parses, left out of the options the step runs with
    options: tuple[str, ...] = ()
    #: where the root is defined, for a reference made elsewhere (`a loop's checkpoint and until`)
    defined_in: str = ""
    #: the hint for a reference to the holding step from one of its own steps
    sees_holder: str = ""
    #: the hint for a reference to a held step from outside (`{holder}`: the holding step's id)
    from_outside: str = ""
    #: the hint when this kind is put inside another's steps (it cannot be)
    not_nested: str = ""


class Nest(Protocol):
    """How a kind that holds steps validates them (`Step.check_nested`); paths are inside the
    step's options, e.g. `("checkpoints", 0, "steps")`."""

    spec_dir: Path

    def steps(self, path: tuple, raw: Any) -> tuple[StepSpec, ...]:
        """A list of held steps: checked like the spec's own, run in the order written; their
        references to top-level steps become the holding step's dependencies."""

    def condition(self, path: tuple, raw: Any) -> Any:
        """A condition over params, steps and the kind's root (`Holds.root`), or None."""

    def problem(self, path: tuple, message: str, hint: str | None = None) -> None:
        """Report a problem at `path`."""


@dataclass
class CheckContext:
    """What a kind may look at while a spec is validated (no servers, no Prefect)."""

    spec_dir: Path
    model_aliases: tuple[str, ...]
    problem: Callable[..., Problem]  # problem(path_in_step_options, message, hint=None)
    server_names: tuple[str, ...] = ("default",)
    #: the most tokens a model may be loaded with, where the spec says (its context_length as a
    #: number, or a larger one a load_model step asks for); a model not listed: unknown until run
    context_lengths: dict[str, int] = field(default_factory=dict)


@dataclass
class StepResult:
    """A step's output and what is worth knowing about how it was produced.

    The typed fields are what any executor (a top-level step, a map item) reports
    without knowing the kind; `meta` holds the kind's own facts (tokens, timings).
    """

    output: Any
    meta: dict[str, Any] = field(default_factory=dict)
    #: which link of a fallback chain answered ({"link": index, "target": "model x"}); None: no chain
    answered_by: dict[str, Any] | None = None
    #: every failed attempt and skipped link before the answer (link, error_type, message, attempt)
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: a markdown report for Prefect's UI (a probe's table and chart)
    artifact: str | None = None

    @property
    def degraded(self) -> bool:
        """True when a fallback link answered, not the first one: the answer is not reused next run."""
        return bool(self.answered_by and self.answered_by.get("link"))


class Session(Protocol):
    """The run a step belongs to: its models and servers, and what its steps share."""

    #: every model alias of the spec, as declared
    models: dict[str, ModelConfig]
    #: breakers, resource guard and response cache, shared by the run's steps
    resilience: Resilience | None
    #: the spec's response_cache block (None: off unless the step turns it on)
    response_cache: ResponseCacheConfig | None

    def backend_for(self, alias: str) -> tuple[Backend, ModelConfig]:
        """The model's server and its effective settings (a probed context length resolved)."""

    def ready(self, alias: str) -> tuple[Backend, ModelConfig]:
        """`backend_for`, with the model loaded as declared before its first chat."""

    def raw_model(self, alias: str) -> tuple[Backend, ModelConfig]:
        """The model as declared (a probe must not need its own result)."""

    def server_backend(self, name: str) -> Backend:
        """A server by name."""

    def load(self, alias: str, model: ModelConfig) -> ModelInfo:
        """Load this model (with a step's overrides) for the run: unloaded at its end unless kept."""

    def model_unloaded(self, alias: str) -> None:
        """The step unloaded this model."""

    def model_identity(self, alias: str) -> dict[str, Any]:
        """What about a model changes its answers (response cache keys)."""

    def model_probed(self, alias: str) -> None:
        """A probe of this model finished: a `probed` size is read again at its next use."""


class KeySource(Protocol):
    """What a step's cache key may read of its run (`Step.nested_material`)."""

    spec: Any  # the run's Spec: its params, steps and folder
    #: the outputs of the top-level steps that have finished
    outputs: dict[str, Any]

    def model_identity(self, alias: str) -> dict[str, Any]:
        """What about a model changes its answers."""


class FixedModels:
    """A `Session` of fixed models on fixed backends: a kind run outside a spec (tests, embedding)."""

    def __init__(self, models: dict[str, tuple[Backend, ModelConfig]], *,
                 resilience: Resilience | None = None,
                 response_cache: ResponseCacheConfig | None = None):
        self._models = models
        self.models = {alias: model for alias, (_backend, model) in models.items()}
        self.resilience = resilience
        self.response_cache = response_cache
        self.loaded: dict[str, ModelConfig] = {}

    def backend_for(self, alias: str) -> tuple[Backend, ModelConfig]:
        return self._models[alias]

    raw_model = ready = backend_for

    def server_backend(self, name: str) -> Backend:
        return next(backend for backend, model in self._models.values() if model.server == name)

    def load(self, alias: str, model: ModelConfig) -> ModelInfo:
        info = self._models[alias][0].load(model)
        self.loaded[alias] = model
        return info

    def model_unloaded(self, alias: str) -> None:
        self.loaded.pop(alias, None)

    def model_identity(self, alias: str) -> dict[str, Any]:
        return self._models[alias][1].identity()

    def model_probed(self, alias: str) -> None:
        """Fixed models are given resolved: nothing to read again."""


@dataclass
class StepContext:
    """What a running step gets: who it is, its policy, the run's models and servers, a way to report."""

    step_id: str
    spec_dir: Path
    session: Session
    #: retries, backoff and timeouts (kinds that retry their model calls themselves use it)
    policy: Policy = field(default_factory=lambda: _default_policy())
    emit: Callable[[str, dict[str, Any]], None] = lambda kind, data: None
    #: set when the run is being stopped: long waits (user code) end early
    stopping: threading.Event | None = None
    #: the spec's step this unit runs (None: a kind run outside a spec)
    step: StepSpec | None = None
    #: how a kind that holds steps of its own (a loop's checkpoints) runs them, each one a unit
    #: like any other: `units.run(step, units.names(extra, outputs), name)` -> its Outcome
    #: (lmflow.engine.unit.Lifecycle; None outside a spec)
    units: Lifecycle | None = None

    @property
    def timeout(self) -> float:
        return self.policy.timeout


def _default_policy() -> Policy:
    from ..spec.model import Policy

    return Policy()


class Step(ABC):
    """One kind of step."""

    kind: ClassVar[str]
    summary: ClassVar[str] = ""
    #: False for steps with side effects (loading a model): never answered from the cache
    cacheable: ClassVar[bool] = True
    #: True for kinds that change a model's or a server's state (load, unload, start): steps that
    #: use that model or server keep their written order around them (see `servers()`)
    changes_state: ClassVar[bool] = False
    #: True for kinds that retry their model calls themselves (per link of a fallback chain):
    #: the flow then does not retry the whole step on top of that
    retries_inside: ClassVar[bool] = False
    options_schema: ClassVar[dict[str, Any]]

    def check(self, options: dict[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        """Problems that the JSON Schema cannot see (files, model aliases)."""
        return ()

    def prepare(self, options: dict[str, Any], spec_dir: Path) -> dict[str, Any]:
        """Inline what the options point at (template files, schema files) before a run.

        The result is what the cache key is computed from, so a changed prompt
        file is a changed step.
        """
        return options

    def models(self, options: dict[str, Any]) -> list[str]:
        """Model aliases the step uses."""
        return []

    def servers(self, options: dict[str, Any]) -> list[str]:
        """Server names the step uses directly (beyond its models' servers)."""
        return []

    def output_schema(self, options: dict[str, Any], spec_dir: Path) -> dict[str, Any] | None:
        """JSON Schema of the output when known, so references to fields can be checked."""
        return None

    def cache_material(self, options: dict[str, Any], spec_dir: Path) -> Any:
        """Extra data that changes the answer and is not in the options (file hashes)."""
        return None

    #: for a kind that holds steps of its own (a loop's checkpoints): what it offers them
    holds: ClassVar[Holds | None] = None

    def check_nested(self, options: dict[str, Any], nest: Nest) -> Any:
        """For a kind that `holds` steps: validate what it holds through `nest` (its lists of
        steps, its conditions) and return the parsed structure, which the run sees as
        `StepSpec.nested`. Called after `check`, whatever it found, so that every problem
        inside is reported at once."""
        return None

    def nested_material(self, step: StepSpec, run: KeySource) -> dict[str, Any] | None:
        """For a kind that holds steps of its own (a loop's checkpoints): what those steps ask
        and of which models, added to the step's cache key (None: nothing)."""
        return None

    def plan_lines(self, step: StepSpec, params: dict[str, Any]) -> list[str]:
        """Lines `lmflow plan` adds under the step (how a loop stops, what its checkpoints run)."""
        return []

    @abstractmethod
    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        """Run with fully resolved options."""


#: the `model` option of every kind that uses a model
MODEL_OPTION: dict[str, Any] = {"type": "string", "description": "A model alias from `models`."}
FUNCTION_PATTERN = r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*"
FALLBACK_OPTION: dict[str, Any] = {
    "type": "array",
    "description": "What answers when the model cannot, tried in order: a model alias, "
                   "{python: module:function} (plain code, called with the request) or {value: ...}.",
    "items": {"description": "A model alias, {python: module:function} or {value: ...}.", "oneOf": [
        {"type": "string", "description": "A model alias from `models`."},
        {"type": "object", "required": ["python"], "additionalProperties": False,
         "properties": {"python": {"type": "string", "pattern": f"^{FUNCTION_PATTERN}$"}}},
        {"type": "object", "required": ["value"], "additionalProperties": False,
         "properties": {"value": {}}},
    ]},
}


def check_model_alias(options: dict[str, Any], ctx: CheckContext) -> Iterator[Problem]:
    """An unknown model alias, with the nearest known one as a hint."""
    from ..spec.hints import suggest

    model = options.get("model")
    if model not in ctx.model_aliases:
        hint = suggest(model, ctx.model_aliases) if ctx.model_aliases else "declare it under models"
        yield ctx.problem(("model",), f"unknown model '{model}'", hint)


class ModelStep(Step):
    """A kind whose `model` option names a model alias."""

    def check(self, options: dict[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        return check_model_alias(options, ctx)

    def models(self, options: dict[str, Any]) -> list[str]:
        return [options["model"]]
