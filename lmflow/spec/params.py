"""Params: their declarations, the values given with -p, their checks and coercion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import Problem, SpecError
from .hints import suggest as _suggest
from .loader import MAX_DEPTH, Document, PathT, parse_yaml

_JSON_TYPES = {
    dict: "object", list: "array", str: "string", bool: "boolean",
    int: "integer", float: "number", type(None): "null",
}


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


#: a param's declarable types, and the Python values each accepts
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,),
}
_PARAM_KEYS = {"type", "default", "description", "enum", "minimum", "maximum"}


@dataclass(frozen=True)
class ParamDecl:
    """A declared param: its type (None: any) and default, from `name: default` or the long form."""

    type: str | None
    default: Any = None
    enum: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    declared: bool = False  # the long form, `{type: number, default: 0}`: the type was said, not guessed


def _inferred_type(default: Any) -> str | None:
    if default is None:
        return None
    if isinstance(default, bool):
        return "boolean"
    return next((name for name, kinds in PARAM_TYPES.items()
                 if name != "number" and isinstance(default, kinds)), "number")


def param_decl(doc: Document | None, name: str, raw: Any, problems: list[Problem]) -> ParamDecl:
    """`sleep: 0` (type inferred from the default) or `sleep: {type: number, default: 0}` (problems
    are told to `doc`'s list; None: already told)."""

    def report(path: PathT, message: str, hint: str | None = None) -> None:
        if doc is not None:
            problems.append(doc.problem(path, message, hint))

    if not (isinstance(raw, dict) and "type" in raw and set(raw) <= _PARAM_KEYS):
        return ParamDecl(_inferred_type(raw), raw)
    path = ("params", name)
    kind = raw["type"]
    if kind not in PARAM_TYPES:
        report(path + ("type",), f"unknown param type {kind!r}", "use one of: " + ", ".join(PARAM_TYPES))
        return ParamDecl(None, raw.get("default"))
    enum = raw.get("enum")
    if enum is not None and not isinstance(enum, list):
        report(path + ("enum",), "enum must be a list of the allowed values")
        enum = None
    bounds = {}
    for bound in ("minimum", "maximum"):
        value = raw.get(bound)
        if value is not None and (kind not in ("integer", "number") or isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            report(path + (bound,), f"{bound} needs a number, on an integer or number param")
            value = None
        bounds[bound] = value
    decl = ParamDecl(kind, raw.get("default"), tuple(enum) if enum else None, declared=True, **bounds)
    if decl.default is not None:
        try:
            _check_param(decl, decl.default)
        except ValueError as exc:
            report(path + ("default",), f"the default does not fit: {exc}")
    return decl


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether a value (a deployment's typed parameter) nests more than `limit` levels, without
    recursion."""
    level = [value]
    for _ in range(limit + 1):
        level = [v for c in level if isinstance(c, (dict, list))
                 for v in (c.values() if isinstance(c, dict) else c)]
        if not level:
            return False
    return True


def _check_param(decl: ParamDecl, value: Any) -> None:
    if _nested_deeper(value, MAX_DEPTH):
        raise ValueError(f"the value is nested more than {MAX_DEPTH} levels deep (flatten it)")
    kinds = PARAM_TYPES[decl.type] if decl.type else ()
    if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and decl.type != "boolean")):
        raise ValueError(f"expected {decl.type}, got {type_name(value)} {value!r}")
    if decl.enum is not None and value not in decl.enum:
        raise ValueError(f"{value!r} is not one of {', '.join(map(repr, decl.enum))}")
    if decl.minimum is not None and value < decl.minimum:
        raise ValueError(f"{value!r} is below the minimum {decl.minimum}")
    if decl.maximum is not None and value > decl.maximum:
        raise ValueError(f"{value!r} is above the maximum {decl.maximum}")


def coerce_param(name: str, raw: Any, decl: ParamDecl) -> Any:
    """A -p value (text, read as YAML unless the param is a string) or a deployment's parameter
    (typed), checked against the param's type."""
    value = raw
    if isinstance(raw, str) and decl.type not in (None, "string"):
        try:  # the spec's own bounded reader: a value nested 500 deep is refused, not a RecursionError
            value = parse_yaml(raw, f"-p {name}").data
        except SpecError as exc:
            problem = exc.problems[0]
            raise ValueError(f"cannot parse {_short(raw)}: {problem.message}"
                             + (f" ({problem.hint})" if problem.hint else "")) from None
        if decl.type == "number" and isinstance(value, str):
            try:  # `1e3`, which YAML 1.1 reads as text
                value = float(value)
            except ValueError:
                pass
    try:
        _check_param(decl, value)
    except ValueError as exc:
        if decl.declared or decl.type != "integer" or not isinstance(value, float):
            raise
        raise ValueError(f"{exc}: the default {decl.default!r} makes '{name}' an integer; to accept "
                         f"decimals declare `params: {{{name}: {{type: number, default: "
                         f"{decl.default!r}}}}}`") from None
    return value


def check_params(doc: Document, overrides: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    raw = doc.data.get("params") if isinstance(doc.data.get("params"), dict) else {}
    decls = {name: param_decl(doc, name, value, problems) for name, value in (raw or {}).items()}
    params = {name: decl.default for name, decl in decls.items()}
    for name, value in overrides.items():
        if name not in params:
            problems.append(Problem("command line", None, None, f"-p {name}",
                                    f"unknown parameter '{name}'",
                                    _suggest(name, params) or "this spec declares no params"))
            continue
        try:
            params[name] = coerce_param(name, value, decls[name])
        except ValueError as exc:
            problems.append(Problem("command line", None, None, f"-p {name}", str(exc)))
    return params
