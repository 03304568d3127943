"""The OpenAI-compatible client: requests it sends and how it classifies failures.

Server answers are scripted at the httpx transport seam; connection refused is real.
"""

from __future__ import annotations

import json

import httpx
import pytest

from lmflow.backends.base import ChatRequest
from lmflow.backends.local import free_port
from lmflow.backends.openai import OpenAIClient, base_url
from lmflow.errors import (
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    ContextOverflow,
    ModelNotFound,
)
from lmflow.spec.model import ModelConfig

MODEL = ModelConfig(alias="m", key="qwen-7b")


def client(handler) -> OpenAIClient:
    return OpenAIClient("http://127.0.0.1:9/v1/", transport=httpx.MockTransport(handler))


def answer(content: str, **extra) -> httpx.Response:
    return httpx.Response(200, json={
        "model": "qwen-7b", "choices": [{"message": {"content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3}, **extra})


def test_base_url_accepts_v1_and_slashes() -> None:
    assert base_url("http://h:1/v1/") == base_url("http://h:1") == "http://h:1"


def test_chat_sends_schema_and_sampling_and_reads_usage() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"] = request.url.path
        seen["body"] = json.loads(request.content)
        return answer('{"a": 1}')

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    response = client(handler).chat(ChatRequest(
        model=MODEL, messages=[{"role": "user", "content": "hi"}],
        sampling={"temperature": 0, "max_tokens": 5, "seed": None}, response_schema=schema))
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"]["model"] == "qwen-7b"
    assert seen["body"]["temperature"] == 0 and "seed" not in seen["body"]
    assert seen["body"]["response_format"]["json_schema"]["schema"] == schema
    assert (response.text, response.prompt_tokens, response.completion_tokens) == ('{"a": 1}', 11, 3)


def test_llama_cpp_context_overflow() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {
            "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 5000,
            "n_ctx": 4096, "message": "the request exceeds the available context size"}})

    with pytest.raises(ContextOverflow) as info:
        client(handler).chat(ChatRequest(model=MODEL, messages=[]))
    assert (info.value.n_prompt, info.value.n_ctx) == (5000, 4096)
    assert not info.value.retryable
    assert str(info.value) == (
        "context overflow at http://127.0.0.1:9: 5000 tokens sent, the loaded context holds "
        "4096: shorten the prompt or load the model with a larger context_length")


def test_openai_style_context_overflow() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {
            "code": "context_length_exceeded", "type": "invalid_request_error",
            "message": "This model's maximum context length is 8192 tokens. However, your "
                       "messages resulted in 9001 tokens."}})

    with pytest.raises(ContextOverflow) as info:
        client(handler).chat(ChatRequest(model=MODEL, messages=[]))
    assert (info.value.n_prompt, info.value.n_ctx) == (9001, 8192)


def test_unknown_model_is_not_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "model 'qwen-7b' not found"}})

    with pytest.raises(ModelNotFound) as info:
        client(handler).chat(ChatRequest(model=MODEL, messages=[]))
    assert not info.value.retryable
    assert "lmflow models --server URL" in str(info.value)


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (400, False), (401, False)])
def test_http_errors_are_retryable_only_when_they_can_heal(status: int, retryable: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "nope"}})

    with pytest.raises(BackendHTTPError) as info:
        client(handler).chat(ChatRequest(model=MODEL, messages=[]))
    assert info.value.retryable is retryable
    assert info.value.status == status


def test_timeout_is_classified() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(BackendTimeout) as info:
        client(handler).chat(ChatRequest(model=MODEL, messages=[], timeout=2.5))
    assert info.value.retryable
    assert "within 2.5s" in str(info.value)


def test_connection_refused_for_real() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(BackendUnreachable) as info:
        OpenAIClient(f"http://127.0.0.1:{port}", start_hint="start it with `lms server start`").chat(
            ChatRequest(model=MODEL, messages=[]))
    assert info.value.retryable
    assert str(info.value).startswith(f"cannot reach http://127.0.0.1:{port} (ConnectError")
    assert str(info.value).endswith("start it with `lms server start`")


def test_streamed_answer_measures_the_first_token() -> None:
    events = (
        'data: {"model": "qwen-7b", "choices": [{"index": 0, "delta": {"content": "4"}}]}\n\n'
        'data: {"model": "qwen-7b", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],'
        ' "usage": {"prompt_tokens": 9, "completion_tokens": 1}}\n\n'
        "data: [DONE]\n\n")
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, text=events, headers={"content-type": "text/event-stream"})

    response = client(handler).chat(ChatRequest(model=MODEL, messages=[], stream=True))
    assert seen["body"]["stream"] is True and seen["body"]["stream_options"] == {"include_usage": True}
    assert (response.text, response.finish_reason, response.prompt_tokens) == ("4", "stop", 9)
    assert response.first_token_seconds is not None
    assert response.first_token_seconds <= response.seconds


def test_streamed_request_errors_are_classified_too() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"type": "exceed_context_size_error",
                                                   "n_prompt_tokens": 9000, "n_ctx": 4096}})

    with pytest.raises(ContextOverflow):
        client(handler).chat(ChatRequest(model=MODEL, messages=[], stream=True))


@pytest.mark.parametrize("reply", [
    httpx.Response(200, text="<html>LM Studio</html>"),  # a web page at server.url
    httpx.Response(200, json=["not", "an", "object"]),
    httpx.Response(200, json={"choices": "none"}),
    httpx.Response(200, json={"choices": [{"message": None}]}),
])
def test_answers_that_break_the_api_are_classified(reply: httpx.Response) -> None:
    from lmflow.errors import MalformedAnswer

    with pytest.raises(MalformedAnswer) as info:
        client(lambda request: reply).chat(ChatRequest(model=MODEL, messages=[]))
    assert not info.value.retryable
    assert "http://127.0.0.1:9" in str(info.value)


def test_a_stream_chunk_that_does_not_parse_is_classified() -> None:
    from lmflow.errors import MalformedAnswer

    broken = httpx.Response(200, text='data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: {oops\n\n')
    with pytest.raises(MalformedAnswer, match="streamed a chunk that is not a JSON object: '{oops'"):
        client(lambda request: broken).chat(ChatRequest(model=MODEL, messages=[], stream=True))


def test_models_on_a_web_page_instead_of_a_model_server(tmp_path) -> None:
    """`lmflow models` against a plain web server answering HTML: a classified error, exit 3."""
    import subprocess
    import sys

    from conftest import lmflow_in_process

    (tmp_path / "api" / "v1").mkdir(parents=True)
    (tmp_path / "api" / "v1" / "models").write_text("<html>not a model server</html>")
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from conftest import wait_for

        assert wait_for(lambda: _answers(port), timeout=60)
        out = lmflow_in_process("models", "--server", f"http://127.0.0.1:{port}")
        assert out.exit_code == 3, out.stderr
        assert "with a body that is not JSON ('<html>not a model server</html>'): is server.url a model " \
               "server?" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        web.terminate()
        web.wait(10)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
