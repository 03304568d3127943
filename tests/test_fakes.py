"""`lmflow.testing.ScriptedBackend`, the scripted backend lmflow ships for tests: what its module
docstring promises (the kinds' and the probe's tests use it in earnest)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

from lmflow.backends import backend_class, create_backend, register_backend
from lmflow.backends.base import ChatRequest, ChatResponse, ModelInfo
from lmflow.errors import BackendUnreachable
from lmflow.spec.model import ModelConfig, ServerConfig
from lmflow.testing import ScriptedBackend

MODEL = ModelConfig(alias="m", key="k", context_length=2048)


def ask(backend: ScriptedBackend, text: str) -> ChatResponse:
    return backend.chat(ChatRequest(model=MODEL, messages=[{"role": "user", "content": text}]))


def test_replies_answer_in_order_and_the_requests_are_kept() -> None:
    whole = ChatResponse(text="cut", finish_reason="length")
    backend = ScriptedBackend("first", whole, BackendUnreachable("no server answers", url=None))
    first = ask(backend, "a")
    assert (first.text, first.model) == ("first", "k")
    assert ask(backend, "b") is whole
    with pytest.raises(BackendUnreachable, match="no server answers"):
        ask(backend, "c")
    with pytest.raises(AssertionError, match=r"no reply left for chat 4 \(it was given 3\)"):
        ask(backend, "d")
    assert [r.messages[0]["content"] for r in backend.requests] == ["a", "b", "c", "d"]


def test_respond_answers_every_chat() -> None:
    backend = ScriptedBackend(respond=lambda request: request.messages[0]["content"].upper())
    assert [ask(backend, t).text for t in ("a", "b", "c")] == ["A", "B", "C"]
    with pytest.raises(TypeError, match="replies or respond=, not both"):
        ScriptedBackend("a", respond=lambda request: "b")


def test_loads_succeed_at_the_context_asked_and_are_kept() -> None:
    backend = ScriptedBackend(models=["k", ModelInfo("big", max_context_length=32768)])
    assert [(m.key, m.max_context_length) for m in backend.list_models()] == [("k", None), ("big", 32768)]
    info = backend.load(MODEL)
    assert (info.key, info.loaded, info.loaded_context_length) == ("k", True, 2048)
    assert backend.unload(MODEL) == []
    assert (backend.loads, backend.unloads) == ([MODEL], [MODEL])


def test_registered_under_a_kind_of_its_own_it_is_built_from_the_specs_server() -> None:
    from lmflow.backends import _REGISTRY

    @register_backend
    class Parrot(ScriptedBackend):
        kind = "parrot-test"

        def reply(self, request: ChatRequest) -> str:
            return request.messages[-1]["content"]

    try:
        config = ServerConfig(name="birds", backend="parrot-test", url="http://127.0.0.1:9")
        backend = create_backend(config)
        assert backend_class("parrot-test") is Parrot and backend.config is config
        assert ask(backend, "polly").text == "polly"
    finally:
        _REGISTRY.unregister("parrot-test")


def test_the_readmes_example_runs(tmp_path: Path) -> None:
    """README's example, run as it stands, so it cannot drift."""
    section = (ROOT / "README.md").read_text().split("### In your own tests: a scripted backend", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    namespace["test_my_kind_reads_the_answer"](tmp_path)
