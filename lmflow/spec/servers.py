"""Servers and models: their fields (a server's may use `${{ params.X }}`), backend options and
fallback links."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..backends import DEFAULT_BACKEND, Backend, backend_classes
from ..errors import Problem
from ..steps.base import FUNCTION_PATTERN
from . import templates
from .hints import suggest as _suggest
from .loader import Document, PathT
from .model import (
    DEFAULT_SERVER,
    Link,
    ModelConfig,
    ServerConfig,
    parse_duration,
)
from .policy import duration_or_none
from .schema import COMMON_SERVER_KEYS


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


def check_servers(doc: Document, params: dict[str, Any], problems: list[Problem]) -> dict[str, ServerConfig]:
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


def check_models(doc: Document, servers: dict[str, ServerConfig],
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
            ttl=duration_or_none(cfg.get("ttl")), gpu=cfg.get("gpu"),
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

