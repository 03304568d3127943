"""Backends are plugins, registered like step kinds: a toy backend from another package (an entry
point in tests/plugins/toy) is validated with its own options and runs a spec; no module outside
backends/ asks a backend for its name."""

from __future__ import annotations

import ast
import json
import os
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, lmflow_cmd

from lmflow.backends import backend_class, backend_classes, create_backend, register_backend
from lmflow.errors import LmflowError
from lmflow.spec.model import ServerConfig
from lmflow.testing.fakes import ScriptedBackend

PLUGINS = Path(__file__).parent / "plugins"


def with_plugin(*names: str) -> dict[str, str]:
    """The environment of an lmflow process that has these plugin packages installed."""
    paths = [str(PLUGINS / name) for name in names]
    return {"PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}


def toy_spec(tmp_path: Path, server: str) -> Path:
    spec = tmp_path / "toy.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: toy
        server: {server}
        models:
          parrot: {{key: parrot}}
        steps:
          - id: ask
            prompt: {{model: parrot, user: "say hi"}}
        """))
    return spec


def test_a_plugin_backend_is_in_the_schema_with_its_options() -> None:
    out = lmflow_cmd("schema", env=with_plugin("toy"))
    assert out.returncode == 0, out.stderr
    server = json.loads(out.stdout)["$defs"]["server"]
    assert server["properties"]["backend"]["enum"] == ["lmstudio", "local", "openai", "toy"]
    assert server["properties"]["voice"]["enum"] == ["plain", "shout"]
    [toy] = [b for b in server["allOf"] if b["if"].get("properties", {}).get("backend") == {"const": "toy"}]
    assert toy["then"]["properties"]["threads"] is False  # local's option, refused for toy


def test_a_plugin_backends_options_are_validated(tmp_path: Path) -> None:
    good = toy_spec(tmp_path, "{backend: toy, voice: shout}")
    out = lmflow_cmd("validate", str(good), env=with_plugin("toy"))
    assert out.returncode == 0, out.stdout + out.stderr
    bad = toy_spec(tmp_path, "{backend: toy, voice: loud, threads: 2}")
    out = lmflow_cmd("validate", str(bad), env=with_plugin("toy"))
    assert out.returncode == 2
    problems = out.stdout + out.stderr
    assert "toy.yaml:3:31: server.voice: 'loud' is not one of: plain, shout" in problems
    assert ("toy.yaml:3:37: server.threads: 'threads' is an option of the local backend (the toy "
            "backend reads backend, startup_timeout, parallel, voice: remove it or change the backend)"
            ) in problems
    # the toy's option means nothing to another backend
    local = toy_spec(tmp_path, "{backend: local, voice: shout}")
    out = lmflow_cmd("validate", str(local), env=with_plugin("toy"))
    assert "server.voice: 'voice' is an option of the toy backend" in out.stderr
    # without the plugin installed, the name is unknown, and said so with the ones there are
    out = lmflow_cmd("validate", str(toy_spec(tmp_path, "{backend: toy, voice: shout}")))
    assert "server.backend: 'toy' is not one of: lmstudio, local, openai" in out.stderr


def test_a_spec_runs_on_a_plugin_backend(tmp_path: Path, prefect_api: str) -> None:
    spec = toy_spec(tmp_path, "{backend: toy, voice: shout}")
    out = lmflow_cmd("run", str(spec), "--json", env=with_plugin("toy"))
    assert out.returncode == 0, out.stderr
    [step] = json.loads(out.stdout)["steps"]
    assert (step["status"], step["output"]) == ("completed", "TOY HEARD: SAY HI")


def test_a_broken_plugin_is_named_not_a_traceback(tmp_path: Path) -> None:
    out = lmflow_cmd("validate", str(toy_spec(tmp_path, "{backend: local}")), env=with_plugin("broken"))
    assert out.returncode != 0
    assert ("the backend plugin 'broken' (lmflow_no_such_module:Backend) cannot be loaded: "
            "ModuleNotFoundError") in out.stderr
    assert "fix or uninstall the package that provides it" in out.stderr
    assert "Traceback" not in out.stderr


def test_registered_in_process() -> None:
    class Echo(ScriptedBackend):
        kind = "echo-test"

    register_backend(Echo)
    try:
        assert backend_class("echo-test") is Echo
        assert isinstance(create_backend(ServerConfig(name="s", backend="echo-test")), Echo)
    finally:
        from lmflow import backends

        backends._REGISTRY.unregister("echo-test")
    with pytest.raises(LmflowError, match="unknown backend 'echo-test': registered backends are "
                                          "lmstudio, local, openai"):
        backend_class("echo-test")
    with pytest.raises(TypeError, match="is not a Backend subclass"):
        register_backend(dict)  # type: ignore[arg-type]


def test_capabilities_are_declared() -> None:
    classes = backend_classes()
    assert {name for name, cls in classes.items() if cls.owns_server} == {"local"}
    assert {name for name, cls in classes.items() if cls.manages_models} == {"local", "lmstudio"}
    assert classes["lmstudio"].load_options == {"gpu", "ttl", "identifier"}
    assert classes["lmstudio"].default_url == "http://127.0.0.1:1234"


BACKEND_NAMES = {"lmstudio", "local", "openai"}


def test_no_module_outside_backends_compares_a_backend_name() -> None:
    """What a backend can do is asked of its class (owns_server, manages_models, load_options...),
    never by comparing its name: a plugin backend must get the same treatment as a built-in one."""
    found = []
    for path in sorted((ROOT / "lmflow").rglob("*.py")):
        relative = path.relative_to(ROOT / "lmflow")
        if relative.parts[0] in ("backends", "testing"):  # the backends themselves; the LM Studio stand-in
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    if isinstance(side, ast.Constant) and side.value in BACKEND_NAMES:
                        found.append(f"{relative}:{node.lineno}")
                    if isinstance(side, (ast.Tuple, ast.List, ast.Set)) and any(
                            isinstance(e, ast.Constant) and e.value in BACKEND_NAMES for e in side.elts):
                        found.append(f"{relative}:{node.lineno}")
    assert found == []


def test_keep_loaded_on_a_server_lmflow_runs_is_refused(tmp_path: Path) -> None:
    from lmflow.errors import SpecError
    from lmflow.spec import load_spec

    spec = tmp_path / "keep.yaml"
    spec.write_text("version: 1\nname: keep\n"
                    "models:\n  smol: {key: smollm2-135m-instruct, keep_loaded: true}\n"
                    "steps:\n  - id: x\n    prompt: {model: smol, user: hi}\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert info.value.problems[0].render().startswith(
        f"{spec}:4:38: models.smol.keep_loaded: nothing stays loaded on a local server: lmflow runs it "
        "for the run and stops it at the end (remove keep_loaded, or run the server yourself")


def test_a_kind_or_backend_registered_after_a_spec_was_loaded_is_usable_at_once(tmp_path: Path) -> None:
    import lmflow
    from lmflow.spec import load_spec
    from lmflow.steps import _REGISTRY

    spec = tmp_path / "echo.yaml"
    spec.write_text("version: 1\nname: echo\nsteps:\n  - id: a\n    echo: {text: hi}\n")
    with pytest.raises(lmflow.SpecError, match="echo"):
        load_spec(spec)  # builds and caches the schema without the kind

    @lmflow.register
    class Echo(lmflow.Step):
        kind = "echo"
        options_schema = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}},
                          "additionalProperties": False}

        def run(self, options: dict, ctx: lmflow.StepContext) -> lmflow.StepResult:
            return lmflow.StepResult(options["text"])

    @register_backend
    class Quiet(ScriptedBackend):
        kind = "quiet"
        server_options = {"url": {"type": "string"}}

    try:
        assert load_spec(spec).steps[0].kind == "echo"
        spec.write_text("version: 1\nname: echo\nserver: {backend: quiet, url: 'http://127.0.0.1:9'}\n"
                        "steps:\n  - id: a\n    echo: {text: 3}\n")
        with pytest.raises(lmflow.SpecError) as info:  # the new kind's own schema is used
            load_spec(spec)
        assert [p.path for p in info.value.problems] == ["steps[0].echo.text"]
    finally:
        from lmflow.backends import _REGISTRY as backends

        _REGISTRY.unregister("echo")
        backends.unregister("quiet")
    with pytest.raises(lmflow.SpecError, match="echo"):
        load_spec(spec)


def test_registering_something_that_is_not_a_kind_says_so() -> None:
    import lmflow

    with pytest.raises(TypeError, match="is not a Step subclass with a kind"):
        lmflow.register(object)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="is not a Backend subclass with a kind"):
        register_backend(int)  # type: ignore[arg-type]
