"""Turn a YAML file into a validated `Spec`, reporting every problem at once."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from ..backends import DEFAULT_BACKEND, Backend, backend_classes
from ..errors import Problem, SpecError
from ..plugins import by_version
from ..steps import CheckContext, kinds
from ..steps.base import FUNCTION_PATTERN
from . import graph, templates
from .hints import suggest as _suggest
from .loader import MAX_DEPTH, Document, PathT, format_path, load_yaml, parse_yaml
from .model import (
    DEFAULT_SERVER,
    ApplyField,
    Breaker,
    Checkpoint,
    Guard,
    Link,
    LoopSpec,
    ModelConfig,
    Policy,
    ResponseCacheConfig,
    ScheduleSpec,
    ServerConfig,
    Spec,
    StepSpec,
    parse_duration,
    parse_size,
)
from .schema import COMMON_SERVER_KEYS, COMMON_STEP_KEYS, base_schema, spec_schema

_JSON_TYPES = {
    dict: "object", list: "array", str: "string", bool: "boolean",
    int: "integer", float: "number", type(None): "null",
}


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


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
        if _is_reference(error.instance):
            continue  # `max_tokens: ${{ params.n }}`: its type is checked once resolved
        yield from _render_schema_error(doc, error)


def _is_reference(value: Any) -> bool:
    return isinstance(value, str) and templates.is_whole_reference(value)


def _render_schema_error(doc: Document, err: ValidationError) -> Iterator[Problem]:
    path: PathT = tuple(err.absolute_path)
    value = err.instance
    kind = err.validator
    if kind is None:  # a `false` schema: another backend's server option, said by _backend_options
        return
    if kind == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        for extra in sorted(set(value) - set(allowed), key=str):
            hint = _suggest(extra, allowed)
            if path[:1] == ("steps",) and len(path) == 2:
                step_kinds = ", ".join(kinds())
                hint = f"{hint}; step kinds: {step_kinds}" if hint else f"step kinds: {step_kinds}"
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
        yield doc.problem(path, f"expected {expected}, got {_type_name(value)} {value!r}")
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


# ---------------------------------------------------------------- semantic checks


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


def _param_decl(doc: Document | None, name: str, raw: Any, problems: list[Problem]) -> ParamDecl:
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
        raise ValueError(f"expected {decl.type}, got {_type_name(value)} {value!r}")
    if decl.enum is not None and value not in decl.enum:
        raise ValueError(f"{value!r} is not one of {', '.join(map(repr, decl.enum))}")
    if decl.minimum is not None and value < decl.minimum:
        raise ValueError(f"{value!r} is below the minimum {decl.minimum}")
    if decl.maximum is not None and value > decl.maximum:
        raise ValueError(f"{value!r} is above the maximum {decl.maximum}")


def _coerce_param(name: str, raw: Any, decl: ParamDecl) -> Any:
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


def _params(doc: Document, overrides: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    raw = doc.data.get("params") if isinstance(doc.data.get("params"), dict) else {}
    decls = {name: _param_decl(doc, name, value, problems) for name, value in (raw or {}).items()}
    params = {name: decl.default for name, decl in decls.items()}
    for name, value in overrides.items():
        if name not in params:
            problems.append(Problem("command line", None, None, f"-p {name}",
                                    f"unknown parameter '{name}'",
                                    _suggest(name, params) or "this spec declares no params"))
            continue
        try:
            params[name] = _coerce_param(name, value, decls[name])
        except ValueError as exc:
            problems.append(Problem("command line", None, None, f"-p {name}", str(exc)))
    return params


_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?#-]+$")


def _cron_problem(line: str) -> str | None:
    """Why a cron line is not one (Prefect checks it fully at deploy time; validate stays light)."""
    fields = line.split()
    if len(fields) == 1 and fields[0].lower() in _CRON_MACROS:
        return None
    if len(fields) != 5:
        return f"a cron line has 5 fields (minute hour day month weekday), this one has {len(fields)}"
    bad = next((f for f in fields if not _CRON_FIELD.match(f)), None)
    return f"'{bad}' is not a cron field" if bad else None


def _schedules(doc: Document, problems: list[Problem]) -> tuple[ScheduleSpec, ...]:
    """`schedule:` (one or a list): exactly one of cron or interval, a real time zone, known params."""
    raw = doc.data.get("schedule")
    if raw is None:
        return ()
    declared = doc.data.get("params") if isinstance(doc.data.get("params"), dict) else {}

    def problem(path: PathT, message: str, hint: str | None = None) -> None:
        problems.append(doc.problem(path, message, hint))

    return schedules(raw, declared, problem, listed=isinstance(raw, list))


def schedules(raw: Any, declared: dict[str, Any], problem: Any, *, listed: bool = True
              ) -> tuple[ScheduleSpec, ...]:
    """Schedules from their YAML form (a spec's or the command line's); `problem(path, message,
    hint)` is told what is wrong with each."""
    import zoneinfo

    found = []
    for i, entry in enumerate(raw if isinstance(raw, list) else [raw]):
        path: PathT = ("schedule", i) if listed else ("schedule",)
        if not isinstance(entry, dict):
            continue  # the schema reports it
        if ("cron" in entry) == ("interval" in entry):
            problem(path, "a schedule needs exactly one of cron or interval",
                    "e.g. {cron: '0 6 * * *'} or {interval: 1h}")
            continue
        cron = entry.get("cron")
        if isinstance(cron, str) and (why := _cron_problem(cron)):
            problem(path + ("cron",), why, "e.g. '0 6 * * 1-5' is 06:00 on weekdays")
        interval = entry.get("interval")
        try:
            seconds = parse_duration(interval) if interval is not None else None
        except ValueError as exc:
            problem(path + ("interval",), str(exc), "e.g. 15m, 1h, 1d")
            seconds = None
        zone = entry.get("timezone")
        if isinstance(zone, str):
            try:
                zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problem(path + ("timezone",), f"unknown time zone {zone!r}",
                        "use an IANA name such as Europe/Berlin or UTC")
        params = {}
        given = entry.get("params") if isinstance(entry.get("params"), dict) else {}
        for name, value in given.items():
            if name not in declared:
                problem(path + ("params", name), f"unknown parameter '{name}'",
                        _suggest(name, declared) or "declare it under params")
                continue
            try:
                params[name] = _coerce_param(name, value, _param_decl(None, name, declared[name], []))
            except ValueError as exc:
                problem(path + ("params", name), str(exc))
        found.append(ScheduleSpec(cron=cron if isinstance(cron, str) else None, interval=seconds,
                                  timezone=zone if isinstance(zone, str) else None, params=params,
                                  active=entry.get("active", True) is not False))
    return tuple(found)


def _server_field(doc: Document, path: PathT, value: Any, params: dict[str, Any],
                  problems: list[Problem]) -> Any:
    """Server fields may use `${{ params.X }}` (e.g. a URL set per machine with -p)."""
    if not isinstance(value, str) or "${{" not in value:
        return value
    try:
        return templates.render(value, {"params": params})
    except templates.TemplateError as exc:
        problems.append(doc.problem(path, f"{exc}", "server fields may only use params"))
        return None


def _servers(doc: Document, params: dict[str, Any], problems: list[Problem]) -> dict[str, ServerConfig]:
    data = doc.data
    if "server" in data and "servers" in data:
        problems.append(doc.problem(("servers",), "give either 'server' or 'servers', not both",
                                    "use 'servers' with names when the pipeline needs several",
                                    key=True))
    raw: dict[str, Any]
    if isinstance(data.get("servers"), dict):
        raw = {name: (cfg, ("servers", name)) for name, cfg in data["servers"].items()}
    elif isinstance(data.get("server"), dict):
        raw = {DEFAULT_SERVER: (data["server"], ("server",))}
    else:
        raw = {DEFAULT_SERVER: ({}, ())}
    classes = backend_classes()
    servers = {}
    for name, (cfg, path) in raw.items():
        if not isinstance(cfg, dict):
            continue
        cfg = {k: _server_field(doc, path + (k,), v, params, problems) for k, v in cfg.items()}
        backend = cfg.get("backend", DEFAULT_BACKEND)
        cls = classes.get(backend) if isinstance(backend, str) else None  # else: the schema says so
        url = cfg.get("url") or (cls.default_url if cls else None)
        if cls is not None:
            _backend_options(doc, path, cfg, backend, cls, classes, problems)
            if "url" in cls.server_options and not url:  # it reads one and has no default
                article = "an" if backend[:1] in tuple("aeiou") else "a"
                problems.append(doc.problem(path, f"{article} {backend} server needs a url",
                                            "e.g. url: http://127.0.0.1:8080"))
        try:
            startup = parse_duration(cfg.get("startup_timeout", 60))
        except (ValueError, TypeError):
            startup = 60.0
        servers[name] = ServerConfig(
            name=name, backend=str(backend), url=url, api_key_env=cfg.get("api_key_env"),
            start=cfg.get("start"), stop=cfg.get("stop"), startup_timeout=startup, threads=cfg.get("threads"),
            max_restarts=cfg.get("max_restarts", 3) if isinstance(cfg.get("max_restarts", 3), int) else 3,
            parallel=cfg.get("parallel"),
            args=tuple(map(str, cfg["args"])) if isinstance(cfg.get("args"), list) else (),
            shared_limit=cfg.get("shared_limit") is True,
            options={k: v for k, v in cfg.items() if k not in _SERVER_FIELDS},
        )
    return servers


#: the model keys that only some backends' loads honour (`Backend.load_options`)
_LOAD_OPTIONS = {"ttl", "gpu", "identifier"}
#: the server keys that are `ServerConfig` fields; a plugin backend's own go to `options`
_SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)} - {"name", "options"}


def _backend_options(doc: Document, path: PathT, cfg: dict[str, Any], backend: str, cls: type[Backend],
                     classes: dict[str, type[Backend]], problems: list[Problem]) -> None:
    """Options of other backends given to this one (the schema refuses them; this says why)."""
    for key in cfg:
        if key in COMMON_SERVER_KEYS or key in cls.server_options:
            continue
        owners = [name for name, other in classes.items() if key in other.server_options]
        if not owners:
            continue  # no backend's: the schema calls it an unknown key, with a suggestion
        if key == "url" and cls.owns_server:
            message, hint = (f"a {backend} server has no url: lmflow starts it",
                             "use backend: openai to talk to a server you run yourself")
        else:
            own = ", ".join([*COMMON_SERVER_KEYS, *cls.server_options])
            message = f"'{key}' is an option of the {' and '.join(owners)} backend{'s' * (len(owners) > 1)}"
            hint = f"the {backend} backend reads {own}: remove it or change the backend"
        problems.append(doc.problem(path + (key,), message, hint, key=True))


def _models(doc: Document, servers: dict[str, ServerConfig],
            problems: list[Problem]) -> dict[str, ModelConfig]:
    classes = backend_classes()
    raw = doc.data.get("models")
    models: dict[str, ModelConfig] = {}
    if not isinstance(raw, dict):
        return models
    for alias, cfg in raw.items():
        if not isinstance(cfg, dict) or not isinstance(cfg.get("key"), str):
            continue
        server = cfg.get("server", DEFAULT_SERVER)
        if server not in servers:
            problems.append(doc.problem(("models", alias, "server"), f"unknown server '{server}'",
                                        _suggest(server, servers)))
        elif (cls := classes.get(servers[server].backend)) is not None:
            problem = cls.model_problem(cfg["key"], cfg.get("path"))
            if problem:
                problems.append(doc.problem(("models", alias, "key"), *problem))
            if cls.owns_server and cfg.get("keep_loaded") is True:
                problems.append(doc.problem(
                    ("models", alias, "keep_loaded"),
                    f"nothing stays loaded on a {servers[server].backend} server: lmflow runs it for "
                    "the run and stops it at the end",
                    "remove keep_loaded, or run the server yourself (backend: openai or lmstudio) to "
                    "keep a model loaded between runs", key=True))
            for option in sorted(set(cfg) & _LOAD_OPTIONS - cls.load_options):
                owners = " and ".join(name for name, other in classes.items() if option in other.load_options)
                problems.append(doc.problem(("models", alias, option),
                                            f"'{option}' is a load option of the {owners} backend",
                                            f"the {servers[server].backend} backend ignores it: remove it",
                                            key=True))
        if cfg.get("path") and not Path(doc.file).parent.joinpath(cfg["path"]).expanduser().exists():
            problems.append(doc.problem(("models", alias, "path"), f"file not found: {cfg['path']}",
                                        "paths are relative to the spec's folder"))
        models[alias] = ModelConfig(
            alias=alias, key=cfg["key"], server=server, path=cfg.get("path"),
            context_length=cfg.get("context_length"), options=dict(cfg.get("options") or {}),
            keep_loaded=bool(cfg.get("keep_loaded", False)),
            ttl=_duration_or_none(cfg.get("ttl")), gpu=cfg.get("gpu"),
            identifier=cfg.get("identifier"),
            parallel=cfg.get("parallel") if isinstance(cfg.get("parallel"), int) else None,
            fallback=parse_fallback(cfg.get("fallback")),
        )
    for alias, model in models.items():
        for i, link in enumerate(model.fallback):
            problem = link_problem(link, models, Path(doc.file).resolve().parent)
            if problem:
                problems.append(doc.problem(("models", alias, "fallback", i), *problem))
            elif link.kind == "model" and link.target == alias:
                problems.append(doc.problem(("models", alias, "fallback", i),
                                            f"model '{alias}' cannot be its own fallback"))
    return models


def parse_fallback(raw: Any) -> tuple[Link, ...]:
    """A fallback list as links (entries the schema rejects are left out: it reports them)."""
    links = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, str):
            links.append(Link("model", item))
        elif isinstance(item, dict) and isinstance(item.get("python"), str) and len(item) == 1:
            links.append(Link("python", item["python"]))
        elif isinstance(item, dict) and "value" in item and len(item) == 1:
            links.append(Link("value", item["value"]))
    return tuple(links)


def link_problem(link: Link, models: dict[str, ModelConfig],
                 spec_dir: Path) -> tuple[str, str | None] | None:
    """(message, hint) when a fallback link points at nothing."""
    from ..steps.python import function_problem

    if link.kind == "model" and link.target not in models:
        return f"unknown model '{link.target}'", _suggest(link.target, models)
    if link.kind == "python" and re.fullmatch(FUNCTION_PATTERN, link.target):
        return function_problem(link.target, spec_dir)
    return None


def _resilience(doc: Document) -> tuple[Breaker, Guard | None, ResponseCacheConfig | None]:
    """The top-level breaker, guard and response_cache blocks (their forms are schema-checked)."""
    data = doc.data

    def block(name: str) -> dict[str, Any] | None:
        return data[name] if isinstance(data.get(name), dict) else None

    def safe(parse: Any, value: Any, default: Any) -> Any:
        try:
            return parse(value) if value is not None else default
        except (ValueError, TypeError):
            return default  # already reported by the schema

    breaker = Breaker()
    if (raw := block("breaker")) is not None:
        failures = raw.get("failures", breaker.failures)
        breaker = Breaker(failures=failures if isinstance(failures, int) else breaker.failures,
                          cooldown=safe(parse_duration, raw.get("cooldown"), breaker.cooldown))
    guard = None
    if (raw := block("guard")) is not None:
        idle = raw.get("min_cpu_idle")
        guard = Guard(min_free_memory=safe(parse_size, raw.get("min_free_memory"), None),
                      min_cpu_idle=safe(lambda v: float(str(v).strip().rstrip("%")) / 100, idle, None),
                      action=raw["action"] if raw.get("action") in ("fallback", "wait", "fail")
                      else "fallback",
                      wait=safe(parse_duration, raw.get("wait"), 60.0))
    cache = None
    if (raw := block("response_cache")) is not None:
        folder = raw.get("dir")
        cache = ResponseCacheConfig(
            ttl=safe(parse_duration, raw.get("ttl"), None),
            size_limit=safe(parse_size, raw.get("size_limit"), ResponseCacheConfig.size_limit),
            directory=str(Path(doc.file).resolve().parent / Path(folder).expanduser())
            if isinstance(folder, str) else None)
    return breaker, guard, cache


def _duration_or_none(value: Any) -> float | None:
    try:
        return parse_duration(value) if value is not None else None
    except (ValueError, TypeError):
        return None  # reported by the schema


def _policy(raw: dict[str, Any], base: Policy) -> Policy:
    def duration(key: str, current: float) -> float:
        try:
            return parse_duration(raw[key]) if key in raw else current
        except (ValueError, TypeError):
            return current  # already reported by the schema

    cache, ttl = base.cache, base.cache_ttl
    if isinstance(raw.get("cache"), bool):
        cache = raw["cache"]
    elif isinstance(raw.get("cache"), dict):
        cache = True
        try:
            ttl = parse_duration(raw["cache"]["ttl"]) if "ttl" in raw["cache"] else ttl
        except (ValueError, TypeError):
            pass  # already reported by the schema
    retries = raw.get("retries", base.retries)
    backoff = raw.get("backoff", base.backoff)
    growth = raw.get("timeout_growth", base.timeout_growth)
    return Policy(
        retries=retries if isinstance(retries, int) else base.retries,
        retry_delay=duration("retry_delay", base.retry_delay),
        backoff=float(backoff) if isinstance(backoff, (int, float)) else base.backoff,
        timeout=duration("timeout", base.timeout),
        cache=cache,
        cache_ttl=ttl,
        timeout_growth=(float(growth) if isinstance(growth, (int, float)) and growth >= 1
                        else base.timeout_growth),
    )


def _field_problem(schema: dict[str, Any] | None, field_path: tuple) -> str | None:
    """Why `field_path` cannot exist in an output with this schema (None if it can)."""
    walked = "output"
    for part in field_path:
        if not isinstance(schema, dict):
            return None
        if isinstance(part, int):
            if schema.get("type") not in (None, "array"):
                return f"{walked} is {schema.get('type')}, not a list"
            schema = schema.get("items")
        else:
            props = schema.get("properties")
            if schema.get("type") not in (None, "object"):
                return f"{walked} is {schema.get('type')}, it has no field '{part}'"
            if props is not None and part not in props and not schema.get("additionalProperties"):
                hint = _suggest(part, props)
                return f"{walked} has no field '{part}' in its response_schema ({hint})"
            schema = (props or {}).get(part)
        walked += f"[{part}]" if isinstance(part, int) else f".{part}"
    return None


@dataclass
class _Scope:
    """Where a list of steps sits: the spec's top level, or the steps of a loop's checkpoint."""

    base: PathT = ("steps",)
    #: the loop whose checkpoint this is (None: the top level)
    loop: str | None = None
    #: top-level steps a checkpoint's steps may refer to, and their output schemas
    outer: dict[str, dict | None] = field(default_factory=dict)
    #: where a checkpoint's references to top-level steps go: the loop's own dependencies
    outer_deps: list[str] = field(default_factory=list)
    #: every id given so far, anywhere in the spec (ids are unique across checkpoints too)
    taken: dict[str, PathT] = field(default_factory=dict)
    #: per loop step: the models and servers its checkpoints use, and whether they change them
    resources: dict[str, tuple[list[str], list[str], bool]] = field(default_factory=dict)
    #: a checkpoint's step id -> its loop's id
    parents: dict[str, str] = field(default_factory=dict)
    #: the most tokens each model may be loaded with, where the spec says (`CheckContext.context_lengths`)
    contexts: dict[str, int] = field(default_factory=dict)


def _check_steps(doc: Document, raw_steps: Any, spec_dir: Path, params: dict[str, Any],
                 models: dict[str, ModelConfig], defaults: Policy, problems: list[Problem],
                 server_names: Iterable[str] = ("default",), scope: _Scope | None = None) -> list[StepSpec]:
    scope = scope or _Scope()
    base = scope.base
    nested = scope.loop is not None
    registered = kinds()
    if not isinstance(raw_steps, list):
        return []
    ids = [s.get("id") for s in raw_steps if isinstance(s, dict)]
    parsed: list[tuple[int, dict, str, dict]] = []
    duplicates: set[int] = set()  # positions of steps whose id an earlier step has
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            continue
        step_id = raw.get("id")
        if isinstance(step_id, str):
            if step_id in scope.taken:
                earlier = scope.taken[step_id]
                line = doc.position(earlier)[0]
                problems.append(doc.problem(
                    base + (i, "id"), f"duplicate step id '{step_id}', first given at "
                    f"{format_path(earlier[:-1])}" + (f" (line {line})" if line else ""),
                    "step ids must be unique: rename one"))
                duplicates.add(i)
            scope.taken.setdefault(step_id, base + (i, "id"))
        present = [k for k in raw if k in registered]
        if len(present) != 1:
            if len(present) > 1:
                problems.append(doc.problem(base + (i, present[1]),
                                            f"a step has one kind, found {', '.join(present)}",
                                            "split it into several steps", key=True))
            elif not [k for k in raw if k not in COMMON_STEP_KEYS]:
                problems.append(doc.problem(base + (i,), "step has no kind",
                                            f"add one of: {', '.join(registered)}"))
            continue
        kind = present[0]
        options = raw[kind]
        if nested:
            for key in ("foreach", "parallel", "on_item_error", "after"):
                if key in raw:
                    problems.append(doc.problem(base + (i, key), f"'{key}' is not available in a checkpoint",
                                                "a checkpoint's steps run one after another, in the order "
                                                "written", key=True))
            if kind == "loop":
                problems.append(doc.problem(base + (i, kind), "a loop cannot run inside a checkpoint",
                                            "put the inner loop's work in its body function", key=True))
                continue
        if not isinstance(options, dict) or not isinstance(step_id, str):
            continue
        parsed.append((i, raw, kind, options))

    # options that failed the schema are not prepared (their templates are not checked)
    broken = {p.path for p in problems}

    def schema_ok(i: int, kind: str) -> bool:
        prefix = format_path(base + (i, kind))
        return not any(b == prefix or b.startswith(prefix + ".") for b in broken)

    spec_ids = {s for s in ids if isinstance(s, str)}
    output_schemas: dict[str, dict | None] = {}
    prepared: dict[str, dict] = {}
    for i, raw, kind_name, options in parsed:
        kind = registered[kind_name]

        def problem(sub: PathT, message: str, hint: str | None = None, *, key: bool = False,
                    _i: int = i, _k: str = kind_name) -> Problem:
            return doc.problem(base + (_i, _k) + tuple(sub), message, hint, key=key)

        ctx = CheckContext(spec_dir=spec_dir, model_aliases=tuple(models), problem=problem,
                           server_names=tuple(server_names), context_lengths=scope.contexts)
        kind_problems = list(kind.check(options, ctx))
        problems.extend(kind_problems)
        if kind_problems or not schema_ok(i, kind_name) or i in duplicates:
            continue
        if kind_name == "loop":  # its checkpoints and `until` are parsed below, not resolved as options
            options = {k: v for k, v in options.items() if k not in ("checkpoints", "until")}
        prepared[raw["id"]] = kind.prepare(options, spec_dir)
        output = kind.output_schema(prepared[raw["id"]], spec_dir)
        output_schemas[raw["id"]] = {"type": "array", "items": output} if "foreach" in raw else output

    # a step whose id is taken is reported once, above: its references would be to the other step
    parsed = [p for p in parsed if p[0] not in duplicates]
    position = {raw["id"]: n for n, (_i, raw, _k, _o) in enumerate(parsed)}
    deps: dict[str, list[str]] = {}
    controls: dict[str, dict[str, Any]] = {}
    for i, raw, kind_name, _options in parsed:
        step_id = raw["id"]
        deps[step_id] = []
        mapped = "foreach" in raw

        def depend(path: PathT, root: str, parts: tuple, text: str, offset: int | None = None,
                   _id: str = step_id, _mapped: bool = mapped, _loop: bool = nested) -> None:
            """Check one reference found at `path` and record the dependency it makes."""
            where = graph.at(doc, path, offset)
            if root in ("item", "index") and not _mapped:
                problems.append(where(f"'{text}': {root} is only defined in a step with foreach",
                                      "add foreach: to this step, or refer to params or steps"))
            elif root == "loop" and not _loop:
                problems.append(where(f"'{text}': loop is only defined in a loop's checkpoint and until",
                                      "refer to params or steps"))
            elif root == "loop" and (not parts or parts[0] not in templates.LOOP_FIELDS):
                problems.append(where(f"'{text}': a loop reference is loop.FIELD",
                                      _suggest(str(parts[0]), templates.LOOP_FIELDS) if parts else
                                      "fields: " + ", ".join(templates.LOOP_FIELDS)))
            elif root == "params" and parts and parts[0] not in params:
                problems.append(where(f"unknown parameter '{parts[0]}'",
                                      _suggest(parts[0], params) or "declare it under params"))
            elif root == "steps" and (len(parts) < 2 or parts[1] != "output"):
                problems.append(where(f"'{text}': a step reference is steps.ID.output[.field...]"))
            elif root == "steps":
                target = str(parts[0])
                schemas = output_schemas
                if target == _id:
                    problems.append(where(f"step '{_id}' refers to its own output"))
                    return
                if target in spec_ids:
                    if nested and position.get(target, -1) > position[_id]:
                        problems.append(where(f"step '{target}' runs later in this checkpoint",
                                              "a checkpoint's steps run in the order written"))
                        return
                    if not nested and target not in deps[_id]:
                        deps[_id].append(target)
                elif target in scope.outer:
                    schemas = scope.outer
                    if target not in scope.outer_deps:
                        scope.outer_deps.append(target)
                else:
                    known = spec_ids | set(scope.outer)
                    problems.append(where(f"unknown step '{target}'", _inside_checkpoint(target, scope)
                                          or _suggest(target, known - {_id})))
                    return
                why = _field_problem(schemas.get(target), tuple(parts[2:]))
                if why:
                    problems.append(where(f"{text}: {why}"))

        def template_refs(value: Any, path: PathT, *, item_allowed: bool, _depend: Any = depend) -> None:
            for sub, expr in templates.iter_templates(value):
                try:
                    ref = templates.parse_ref(expr)
                except templates.TemplateError as exc:
                    problems.append(doc.problem(path + sub, str(exc)))
                    continue
                if not item_allowed and ref.root in ("item", "index"):
                    problems.append(doc.problem(path + sub, f"'{ref.text}': foreach cannot refer to "
                                                "its own items", "refer to params or steps"))
                    continue
                _depend(path + sub, ref.root, ref.parts, ref.text)

        template_refs(prepared.get(step_id, {}), base + (i, kind_name), item_allowed=True)
        control: dict[str, Any] = {}
        if mapped and not nested:
            control["foreach"] = graph.foreach_source(doc, i, raw["foreach"], spec_dir, problems)
            if control["foreach"] is not None and control["foreach"].source == "value":
                template_refs(raw["foreach"], ("steps", i, "foreach"), item_allowed=False)
        elif not nested and ("parallel" in raw or "on_item_error" in raw):
            key = "parallel" if "parallel" in raw else "on_item_error"
            problems.append(doc.problem(("steps", i, key), f"'{key}' applies to the items of a foreach",
                                        "add foreach: to this step, or remove it", key=True))
        if "when" in raw:
            roots = ("params", "steps") + (("item", "index") if mapped else ()) \
                + (("loop",) if nested else ())
            control["when"] = graph.condition(doc, base + (i, "when"), raw["when"], roots, depend, problems)
        if kind_name == "loop":
            control["loop"] = _loop(doc, i, raw["loop"], step_id, spec_dir, params, models, defaults,
                                    problems, server_names, scope, deps[step_id], output_schemas,
                                    spec_ids, lambda *a, _d=depend: _d(*a, _loop=True))
        controls[step_id] = control

    if nested:
        order = [raw["id"] for _i, raw, _k, _o in parsed]
    else:
        graph.explicit_and_state_order(doc, parsed, prepared, models, registered, spec_ids, deps, problems,
                                       scope.resources)
        order = graph.order(doc, parsed, deps, problems)
    steps = []
    for i, raw, kind_name, _options in parsed:
        if raw["id"] not in prepared:
            continue
        control = controls.get(raw["id"], {})
        steps.append(StepSpec(
            id=raw["id"], kind=kind_name, options=prepared[raw["id"]],
            policy=_policy(raw, defaults), index=i, description=raw.get("description"),
            depends_on=tuple(deps.get(raw["id"], ())),
            foreach=control.get("foreach"), when=control.get("when"),
            parallel=raw.get("parallel") if isinstance(raw.get("parallel"), int) else None,
            on_item_error=raw.get("on_item_error", "fail"),
            loop=control.get("loop"), parent=scope.loop,
        ))
    by_id = {s.id: s for s in steps}
    return [by_id[s] for s in order if s in by_id]


def _inside_checkpoint(target: str, scope: _Scope) -> str | None:
    """A hint for a reference to a checkpoint's step, or from a checkpoint to its own loop."""
    if target == scope.loop:
        return "a checkpoint sees its loop as loop.state, loop.stats, loop.history and loop.generation"
    loop = scope.parents.get(target)
    if loop is None:
        return None
    if loop == scope.loop:
        return (f"'{target}' belongs to another checkpoint: a checkpoint sees its own steps, the "
                "top-level steps and loop.*")
    return (f"'{target}' is a step of loop '{loop}''s checkpoint: refer to the loop's output instead, "
            f"e.g. steps.{loop}.output.analyses")


def _loop(doc: Document, i: int, raw: dict[str, Any], step_id: str, spec_dir: Path, params: dict[str, Any],
          models: dict[str, ModelConfig], defaults: Policy, problems: list[Problem],
          server_names: Iterable[str], scope: _Scope, loop_deps: list[str],
          output_schemas: dict[str, dict | None], spec_ids: set[str], depend: Any) -> LoopSpec:
    """A loop step's `until` and checkpoints; what their steps refer to becomes the loop's dependencies."""
    path: PathT = ("steps", i, "loop")
    if not isinstance(raw, dict):
        return LoopSpec()
    until = graph.condition(doc, path + ("until",), raw["until"], ("params", "steps", "loop"), depend,
                            problems) if isinstance(raw.get("until"), str) else None
    outer = {s: output_schemas.get(s) for s in spec_ids if s != step_id}
    aliases: list[str] = []
    servers: list[str] = []
    changes = False
    checkpoints = []
    for c, cp in enumerate(raw.get("checkpoints") or []):
        if not isinstance(cp, dict):
            continue
        at = cp.get("at", [])
        inner = _Scope(base=path + ("checkpoints", c, "steps"), loop=step_id, outer=outer,
                       outer_deps=loop_deps, taken=scope.taken, parents=scope.parents,
                       contexts=scope.contexts)
        steps = _check_steps(doc, cp.get("steps"), spec_dir, params, models, defaults, problems,
                             server_names, inner)
        registered = kinds()
        for s in steps:
            scope.parents[s.id] = step_id
            kind = registered[s.kind]
            aliases += [a for a in kind.models(s.options) if a not in aliases]
            servers += [x for x in kind.servers(s.options) if x not in servers]
            changes = changes or kind.changes_state
        checkpoints.append(Checkpoint(
            index=c, at=tuple([at] if isinstance(at, int) else at if isinstance(at, list) else []),
            every=cp.get("every") if isinstance(cp.get("every"), int) else None,
            history=cp.get("history") or raw.get("history") or 5,
            mode=cp.get("mode", "blocking"), steps=tuple(steps),
            apply=_apply(doc, path + ("checkpoints", c, "apply"), cp.get("apply"), spec_dir, problems)))
    scope.resources[step_id] = (aliases, servers, changes)
    return LoopSpec(until=until, checkpoints=tuple(checkpoints))


def _apply(doc: Document, path: PathT, raw: Any, spec_dir: Path,
           problems: list[Problem]) -> str | tuple[ApplyField, ...] | None:
    """A checkpoint's `apply`: a function (it must import) or the fields it sets."""
    if isinstance(raw, str):
        from ..steps.python import function_problem

        problem = function_problem(raw, spec_dir) if re.fullmatch(FUNCTION_PATTERN, raw) else None
        if problem:
            problems.append(doc.problem(path, *problem))
        return raw
    if not isinstance(raw, dict):
        return None
    fields = []
    for target, rule in raw.items():
        rule = rule if isinstance(rule, dict) else {}
        low, high = rule.get("min"), rule.get("max")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            problems.append(doc.problem(path + (target, "min"), f"min {low} is above max {high}"))
        enum = rule.get("enum")
        fields.append(ApplyField(
            target=str(target), source=str(rule.get("from", target)),
            minimum=low if isinstance(low, (int, float)) else None,
            maximum=high if isinstance(high, (int, float)) else None,
            enum=tuple(enum) if isinstance(enum, list) else dict(enum) if isinstance(enum, dict) else None,
            bounds=rule.get("bounds", "clamp")))
    return tuple(fields)


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
    params_values = _params(doc, params or {}, problems)
    servers = _servers(doc, params_values, problems)
    models = _models(doc, servers, problems)
    defaults = _policy(doc.data.get("defaults") if isinstance(doc.data.get("defaults"), dict) else {},
                       Policy())
    steps = _check_steps(doc, doc.data.get("steps"), path.resolve().parent, params_values, models,
                         defaults, problems, servers, _Scope(contexts=_context_lengths(models, doc.data)))
    breaker, guard, response_cache = _resilience(doc)
    schedules = _schedules(doc, problems)
    if problems:
        raise SpecError(_dedupe(problems))
    return Spec(
        file=path.resolve(), name=doc.data["name"], version=doc.data["version"],
        description=doc.data.get("description"), params=params_values, servers=servers,
        models=models, defaults=defaults, steps=steps, breaker=breaker, guard=guard,
        response_cache=response_cache, max_parallel=_max_parallel(doc), schedules=schedules,
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
            if alias in found and is_count(size):
                found[alias] = max(found[alias], size)
            pending.extend(node.values())
    return found  # type: ignore[return-value]


def _max_parallel(doc: Document) -> int:
    defaults = doc.data.get("defaults")
    value = defaults.get("max_parallel") if isinstance(defaults, dict) else None
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
