"""Turn a YAML file into a validated `Spec`, reporting every problem at once."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from ..errors import Problem, SpecError
from ..plugins import by_version
from ..steps import kinds
from . import templates
from .hints import suggest as _suggest
from .loader import Document, PathT, format_path, load_yaml
from .model import (
    ModelConfig,
    Policy,
    Spec,
    StepSpec,
    parse_duration,
)
from .params import check_params, type_name
from .policy import check_resilience, step_policy, takes_params, with_params
from .schedules import check_schedules
from .schema import base_schema, spec_schema
from .servers import check_models, check_servers
from .steps import Scope, StepsChecker


@by_version
def _validator() -> Draft202012Validator:
    return Draft202012Validator(spec_schema(), format_checker=_FORMATS)


def _duration_schema() -> dict[str, Any]:
    return base_schema()["$defs"]["duration"]


def max_duration() -> float:
    """The longest duration a spec may give, in seconds (the schema's bound on a number of seconds)."""
    return float(_duration_schema()["oneOf"][0]["maximum"])


_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("lmflow-duration")
def _bounded_duration(value: Any) -> bool:
    """A duration string (`30s`, `2h`) within the bound that its number form has in the schema."""
    return not _too_long(value)


def _too_long(duration: Any) -> bool:
    """A duration (a number of seconds, or `2h`) beyond `max_duration()`; False when it is not one."""
    try:
        return not isinstance(duration, bool) and parse_duration(duration) > max_duration()
    except (ValueError, TypeError):
        return False  # not a duration at all: the schema's pattern says so


# ---------------------------------------------------------------- schema errors


def _schema_problems(doc: Document) -> Iterator[Problem]:
    for error in _validator().iter_errors(doc.data):
        yield from _render_schema_error(doc, error)


def _is_reference(value: Any) -> bool:
    return isinstance(value, str) and templates.is_whole_reference(value)


def _render_schema_error(doc: Document, err: ValidationError) -> Iterator[Problem]:
    path: PathT = tuple(err.absolute_path)
    value = err.instance
    kind = err.validator
    if _is_reference(value):
        if not takes_params(path, kinds()):  # (said once: problems are deduplicated)
            yield doc.problem(path, f"cannot use {value.strip()}: this field is read as written, before any "
                              "step runs", "write the value itself; params can set a step's policy, parallel "
                              "and cache.ttl, defaults, breaker, guard, response_cache and server fields")
        return  # `max_tokens: ${{ params.n }}`: its type is checked once resolved
    if kind is None:  # a `false` schema: another backend's server option, said by _backend_options
        return
    if kind == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        for extra in sorted(set(value) - set(allowed), key=str):
            hint = _suggest(extra, allowed)
            if path[:1] == ("steps",) and len(path) == 2:
                owners = [name for name, kind in kinds().items()
                          if extra in kind.options_schema.get("properties", {}) and name in value]
                step_kinds = ", ".join(kinds())
                hint = f"{hint}; step kinds: {step_kinds}" if hint else f"step kinds: {step_kinds}"
                if owners:  # `response_cache: {key: ...}` written beside `prompt:` instead of in it
                    hint = f"'{extra}' is an option of {owners[0]}: put it under {owners[0]}:"
            yield doc.problem(path + (extra,), f"unknown key '{extra}'", hint, key=True)
    elif kind == "oneOf" and all("required" in s for s in err.validator_value):
        return  # "exactly one step kind" is reported by _check_steps, more clearly
    elif kind == "oneOf" and err.schema == _duration_schema() and _too_long(value):
        days = f"{max_duration() / 86400:g}d"
        cache = {"cache", "response_cache"} & set(path)
        yield doc.problem(path, f"duration {value!r} is longer than {days}",
                          f"{days} is the longest wait lmflow accepts, as a longer one is most likely a typo"
                          + ("; a cache without ttl never expires" if cache else ""))
    elif kind in ("oneOf", "anyOf") and _inside_one_branch(err):
        # the value has the form of one choice (`cache: {ttl: ...}`): what is wrong inside it says more
        for inner in err.context:
            if len(inner.absolute_path) > len(path):
                yield from _render_schema_error(doc, inner)
    elif kind in ("oneOf", "anyOf"):
        yield doc.problem(path, f"invalid value {value!r}", err.schema.get("description"))
    elif kind == "required":
        missing = err.validator_value
        for name in missing:
            if isinstance(value, dict) and name not in value:
                yield doc.problem(path, f"missing required key '{name}'")
    elif kind == "type":
        expected = err.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        yield doc.problem(path, f"expected {expected}, got {type_name(value)} {value!r}")
    elif kind == "enum":
        choices = ", ".join(map(str, err.validator_value))
        hint = _suggest(value, err.validator_value)
        yield doc.problem(path, f"{value!r} is not one of: {choices}",
                          hint if hint and hint.startswith("did you mean") else None)
    elif kind == "const" and path == ("version",):
        yield doc.problem(path, f"unsupported spec version {value!r}", "this lmflow reads version: 1")
    elif kind == "pattern":
        yield doc.problem(path, f"{value!r} does not match {err.validator_value}",
                          err.schema.get("description")
                          or "names use letters, digits, '_' and '-' and start with a letter")
    elif kind == "propertyNames":
        yield doc.problem(path, err.message, "names use letters, digits, '_' and '-'")
    else:
        yield doc.problem(path, err.message)


def _inside_one_branch(err: ValidationError) -> bool:
    """Whether the only choices of a oneOf/anyOf that failed below the value itself are one choice."""
    deeper = {inner.relative_schema_path[0] for inner in err.context
              if len(inner.absolute_path) > len(err.absolute_path)}
    return len(deeper) == 1



# ---------------------------------------------------------------- entry points


def load_spec(path: str | Path, params: dict[str, Any] | None = None, *, import_code: bool = True) -> Spec:
    """Load and validate a spec; raise SpecError listing every problem found.

    The Python modules the spec names are imported to check their functions (their top level
    runs; nothing is called); `import_code=False` reads their source instead and runs nothing.
    """
    from ..steps.python import IMPORT_CODE

    token = IMPORT_CODE.set(import_code)
    try:
        return _load_spec(Path(path), params)
    finally:
        IMPORT_CODE.reset(token)


def _load_spec(path: Path, params: dict[str, Any] | None) -> Spec:
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise SpecError([doc.problem((), "a spec is a mapping with version, name and steps",
                                     "see examples/quickstart.yaml")])
    problems = list(_schema_problems(doc))
    params_values = check_params(doc, params or {}, problems)
    servers = check_servers(doc, params_values, problems)
    models = check_models(doc, servers, problems)
    raw_defaults = doc.data.get("defaults") if isinstance(doc.data.get("defaults"), dict) else {}
    raw_defaults = with_params(doc, ("defaults",), raw_defaults, params_values, problems)
    defaults = step_policy(raw_defaults, Policy())
    steps = StepsChecker(doc, path.resolve().parent, params_values, models, defaults, problems, servers,
                         Scope(contexts=_context_lengths(models, doc.data))).check(doc.data.get("steps"))
    steps = [_distributed(s, raw_defaults.get("distribute") is True) for s in steps]
    breaker, guard, response_cache = check_resilience(doc, params_values, problems)
    schedules = check_schedules(doc, problems)
    if problems:
        raise SpecError(_dedupe(problems))
    return Spec(
        file=path.resolve(), name=doc.data["name"], version=doc.data["version"],
        description=doc.data.get("description"), params=params_values, servers=servers,
        models=models, defaults=defaults, steps=steps, breaker=breaker, guard=guard,
        response_cache=response_cache, max_parallel=_max_parallel(raw_defaults), schedules=schedules,
    )


def _context_lengths(models: dict[str, ModelConfig], data: dict[str, Any]) -> dict[str, int]:
    """Each model's context_length where it is a number, raised by any step (a load_model, also in a
    checkpoint) that loads the model with a larger one."""
    def is_count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    found = {alias: m.context_length for alias, m in models.items() if is_count(m.context_length)}
    pending = [data.get("steps")]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            alias, size = node.get("model"), node.get("context_length")
            if isinstance(alias, str) and alias in found and is_count(size):
                found[alias] = max(found[alias], size)
            pending.extend(node.values())
    return found  # type: ignore[return-value]


def _distributed(step: StepSpec, by_default: bool) -> StepSpec:
    """A step whose `distribute` is not written: a map in chunks takes `defaults.distribute`."""
    if step.distribute is not None:
        return step
    return replace(step, distribute=by_default and step.foreach is not None and step.grain != "item")


def _max_parallel(defaults: dict[str, Any]) -> int:
    value = defaults.get("max_parallel")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 4


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def validate_files(paths: Iterable[str | Path], *, import_code: bool = True) -> list[Problem]:
    """Every problem in every file (an empty list means all are valid); see `load_spec`."""
    problems: list[Problem] = []
    for path in paths:
        try:
            load_spec(path, import_code=import_code)
        except SpecError as exc:
            problems.extend(exc.problems)
    return problems


__all__ = ["format_path", "load_spec", "validate_files"]
