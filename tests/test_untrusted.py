"""Specs (and test server configs) from untrusted sources: whatever the bytes, `lmflow validate`
answers with problems at file:line:col, quickly, in bounded memory, and never with a traceback.

Alias bombs, self-referring aliases, deep nesting and non-UTF-8 text are checked through the real
command; random YAML documents and random mutations of the shipped specs go through the same
function in-process (hypothesis), which may raise nothing but SpecError.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT, lmflow_in_process
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmflow.errors import SpecError
from lmflow.spec import load_spec

BOMB = "version: 1\nname: bomb\na0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)) + \
    "steps: [{id: x, python: {function: 'json:dumps', args: {obj: *a8}}}]\n"

HOSTILE = {
    "bomb": (BOMB.encode(), "values once its aliases are expanded"),
    "cycle": (b"version: 1\nname: self\nsteps: &s [*s]\n", "an alias refers to a value that contains it"),
    "python-tag": (b"version: 1\nname: t\nsteps: []\nx: !!python/name:os.system ''\n",
                   "the tag tag:yaml.org,2002:python/name:os.system is not allowed"),
    "deep": (b"version: 1\nname: deep\nsteps: " + b"[" * 5000 + b"]" * 5000 + b"\n",
             "nested more than 64 levels deep"),
    "deep-maps": (b"version: 1\nname: deep\nsteps: " + b"{a: " * 3000 + b"1" + b"}" * 3000 + b"\n",
                  "nested more than 64 levels deep"),
    "latin-1": (b"version: 1\nname: caf\xe9\nsteps: []\n",
                "latin-1.yaml:2:1: <document>: not UTF-8 text (byte 20 is 0xe9)"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_documents_get_a_positioned_error_quickly(name: str, tmp_path: Path) -> None:
    data, message = HOSTILE[name]
    spec = tmp_path / f"{name}.yaml"
    spec.write_bytes(data)

    def limit_resources() -> None:
        # 1 GiB of address space: a bomb expanded in memory would need more; 5 s of CPU (a busy box
        # does not count against it): starting Python and refusing the document take well under one
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_CPU, (5, 10))  # SIGXCPU at 5 s, SIGKILL at 10

    out = subprocess.run([str(BIN / "lmflow"), "validate", str(spec)], capture_output=True, text=True,
                         timeout=120, preexec_fn=limit_resources)  # the timeout only ends a hang
    assert out.returncode == 2, (out.returncode, out.stderr)  # -24 (SIGXCPU) or -9: out of CPU time
    assert message in out.stdout + out.stderr
    assert f"{spec}:" in out.stdout + out.stderr  # file:line:col
    assert "Traceback" not in out.stderr


def _shipped_specs() -> list[tuple[str, str]]:
    """(folder relative to the repository, text) of every spec shipped."""
    return [(str(path.parent.relative_to(ROOT)), path.read_text())
            for path in sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yaml"))]


SHIPPED = _shipped_specs()
NOISE = st.sampled_from(["*a", "&a ", "[", "]", "{", "}", ": ", "- ", "\n", "  ", "'", '"', "${{ ",
                         " }}", "!!python/object:os.system ", "<<: *a", "\t", "\x00", "é", "%", "#",
                         "null", "~", "-1", "1e999", "version: 2", "steps: 5", "id: ", "&a [*a]"])


@st.composite
def mutated_spec(draw: st.DrawFn) -> tuple[str, str]:
    """A shipped spec with a few random edits, and its folder (its modules and files are there)."""
    folder, text = draw(st.sampled_from(SHIPPED))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "drop-line", "dup-line"]))
        if action == "insert":
            text = text[:at] + draw(NOISE) + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        elif action == "replace":
            text = text[:at] + draw(NOISE) + text[at + draw(st.integers(1, 10)):]
        else:
            lines = text.splitlines(keepends=True)
            if lines:
                i = draw(st.integers(0, len(lines) - 1))
                lines[i:i + 1] = [] if action == "drop-line" else [lines[i], lines[i]]
            text = "".join(lines)
    return folder, text


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30)


@st.composite
def random_document(draw: st.DrawFn) -> str:
    doc = draw(st.dictionaries(st.sampled_from(["version", "name", "steps", "models", "server", "servers",
                                                "params", "defaults", "x"]), YAML_VALUES, max_size=6))
    return yaml.safe_dump(doc)


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped specs' folders, copied: a mutated spec is written next to what it refers to."""
    root = tmp_path_factory.mktemp("shipped")
    for folder in ("specs", "examples"):
        shutil.copytree(ROOT / folder, root / folder)
    return root


def _validate(folder: Path, text: str) -> bool:
    """Whether the spec is valid; anything but a SpecError (or an answer that takes over 2 s of this
    thread's CPU time: a busy box does not count against it) fails the test."""
    spec = folder / "fuzz.yaml"
    spec.write_text(text, encoding="utf-8", errors="surrogateescape")
    cpu = time.thread_time()
    try:
        load_spec(spec)
        valid = True
    except SpecError as exc:
        assert exc.problems, "a SpecError names at least one problem"
        valid = False
    assert time.thread_time() - cpu < 2
    return valid


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=mutated_spec())
def test_mutated_specs_validate_or_give_problems(copies: Path, spec: tuple[str, str]) -> None:
    folder, text = spec
    valid = _validate(copies / folder, text)
    event("valid" if valid else "problems")  # `pytest --hypothesis-show-statistics` shows the share


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=random_document() | st.text(max_size=300))
def test_random_documents_validate_or_give_problems(tmp_path: Path, text: str) -> None:
    _validate(tmp_path, text)


def test_the_shipped_specs_are_valid_in_their_copies(copies: Path) -> None:
    """The fuzz starts from valid specs, so its mutations reach the checks after parsing."""
    for folder, text in SHIPPED:
        assert _validate(copies / folder, text), folder


CONFIG_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10_000) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["key", "file", "clamp", "answers", "max_context_length", "x"]), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.dictionaries(st.sampled_from(
    ["models", "jit", "api_token", "delay_seconds", "crash_on_request", "error_rate", "error_status",
     "rest_api", "ttl_seconds", "unknown"]), CONFIG_VALUES, max_size=5))
def test_test_server_configs_load_or_give_problems(tmp_path: Path, config: dict) -> None:
    from lmflow.testing.server import load_behaviour

    path = tmp_path / "lmstudio.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        load_behaviour(path)
    except SpecError as exc:
        assert exc.problems


def test_a_bad_test_server_config_is_a_positioned_error(tmp_path: Path) -> None:
    path = tmp_path / "lmstudio.yaml"
    path.write_text("models:\n  - key: smollm2-135m-instruct\n    max_context_length: big\n")
    out = lmflow_in_process("testing", "serve", "--config", str(path))
    assert out.exit_code == 2
    assert f"{path}:3:25: models[0].max_context_length: 'big' is not of type 'integer'" in out.stderr
    assert "Traceback" not in out.stderr
