"""Step kinds against a scripted backend (the Backend seam), no server, no Prefect."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from lmflow.backends.base import Backend, ChatResponse
from lmflow.errors import InvalidResponse
from lmflow.spec.model import ModelConfig, Policy
from lmflow.steps import FixedModels, StepContext, get_kind
from lmflow.steps.python import UserCodeError
from lmflow.testing.fakes import ScriptedBackend

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def context(backend: Backend, spec_dir: Path) -> StepContext:
    model = ModelConfig(alias="m", key="k")
    return StepContext(step_id="s", spec_dir=spec_dir, session=FixedModels({"m": (backend, model)}),
                       policy=Policy(timeout=7.0))


def test_prompt_with_schema_returns_parsed_json(tmp_path: Path) -> None:
    backend = ScriptedBackend(ChatResponse(text='{"n": 3}', model="k", prompt_tokens=9, completion_tokens=4))
    result = get_kind("prompt").run({"model": "m", "system": "sys", "user": "hi", "temperature": 0,
                                     "response_schema": SCHEMA}, context(backend, tmp_path))
    assert result.output == {"n": 3}
    assert result.meta["prompt_tokens"] == 9
    request = backend.requests[0]
    assert request.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert request.timeout == 7.0 and request.sampling["temperature"] == 0


def test_answer_cut_at_max_tokens_says_so(tmp_path: Path) -> None:
    backend = ScriptedBackend(ChatResponse(text='{"n": ', finish_reason="length"))
    with pytest.raises(InvalidResponse, match=r"cut at max_tokens=5 before its JSON was complete"):
        get_kind("prompt").run({"model": "m", "user": "hi", "max_tokens": 5, "response_schema": SCHEMA},
                               context(backend, tmp_path))


def test_answer_not_matching_the_schema(tmp_path: Path) -> None:
    backend = ScriptedBackend(ChatResponse(text='{"n": "three"}'))
    with pytest.raises(InvalidResponse, match=r"does not match response_schema at n: 'three' is not"):
        get_kind("prompt").run({"model": "m", "user": "hi", "response_schema": SCHEMA},
                               context(backend, tmp_path))


def test_images_are_sent_as_openai_image_parts(tmp_path: Path) -> None:
    (tmp_path / "dot.png").write_bytes(b"\x89PNG fake")
    backend = ScriptedBackend(ChatResponse(text="a dot"))
    get_kind("prompt").run({"model": "m", "user": "what is it?", "images": ["dot.png"]},
                           context(backend, tmp_path))
    content = backend.requests[0].messages[-1]["content"]
    assert content[0] == {"type": "text", "text": "what is it?"}
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == b"\x89PNG fake"


def test_image_content_changes_the_cache_material(tmp_path: Path) -> None:
    kind = get_kind("prompt")
    (tmp_path / "a.png").write_bytes(b"one")
    before = kind.cache_material({"images": ["a.png"]}, tmp_path)
    (tmp_path / "a.png").write_bytes(b"two")
    assert kind.cache_material({"images": ["a.png"]}, tmp_path) != before


def test_python_step_reports_where_user_code_failed(tmp_path: Path) -> None:
    (tmp_path / "usercode.py").write_text(
        "def f(x):\n    return {'double': 2 * x}\n\ndef g():\n    raise KeyError('k')\n")
    kind = get_kind("python")
    ctx = context(ScriptedBackend(), tmp_path)
    assert kind.run({"function": "usercode:f", "args": {"x": 4}}, ctx).output == {"double": 8}
    where = f"{tmp_path}/usercode.py:5"
    with pytest.raises(UserCodeError, match=rf"usercode:g raised KeyError: 'k' at {where}") as raised:
        kind.run({"function": "usercode:g"}, context(ScriptedBackend(), tmp_path))
    assert raised.value.retryable  # what the code raised may heal (a flaky call inside): retried
    with pytest.raises(UserCodeError, match="usercode has no function 'h'") as missing:
        kind.run({"function": "usercode:h"}, context(ScriptedBackend(), tmp_path))
    assert not missing.value.retryable  # a missing function stays missing


def test_code_change_changes_the_cache_material(tmp_path: Path) -> None:
    kind = get_kind("python")
    (tmp_path / "mod2.py").write_text("def f():\n    return 1\n")
    before = kind.cache_material({"function": "mod2:f"}, tmp_path)
    (tmp_path / "mod2.py").write_text("def f():\n    return 2\n")
    assert kind.cache_material({"function": "mod2:f"}, tmp_path) != before


def test_a_module_named_like_the_standard_library_is_reported(tmp_path: Path) -> None:
    (tmp_path / "json.py").write_text("def f():\n    return 1\n")
    with pytest.raises(UserCodeError, match=r"module 'json' resolved to .*json.*its name is taken"):
        get_kind("python").run({"function": "json:f"}, context(ScriptedBackend(), tmp_path))


def test_two_specs_with_their_own_helpers_in_one_process(tmp_path: Path) -> None:
    """A served process (or a script calling lmflow.run) runs specs from several folders: each
    spec's `helpers.py` is its own, whichever was imported first."""
    from lmflow.steps.python import function_problem, load_function

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "helpers.py").write_text(f"def who():\n    return {name!r}\n")
    (tmp_path / "b" / "helpers.py").write_text("def who():\n    return 'b'\n\ndef only_b():\n    return 1\n")
    first = load_function("helpers:who", tmp_path / "a")
    assert first() == "a"
    assert load_function("helpers:who", tmp_path / "b")() == "b"
    assert function_problem("helpers:only_b", tmp_path / "b") is None
    assert function_problem("helpers:only_b", tmp_path / "a") is not None  # a's has no only_b
    assert load_function("helpers:who", tmp_path / "a")() == "a"
    assert first() == "a"  # a function taken before keeps working
