"""Every LLM call of the real `lmstudio` 1.5 SDK's sync API against lmflow's LM Studio test server.

One explicit client per test (never the SDK's default client), closed at the end; whatever a test
loads is unloaded (other tests assert that the server has nothing loaded).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import jsonschema
import lmstudio as lms
import pytest
from conftest import MODELS
from httpx_ws import connect_ws

from lmflow.testing.pytest_plugin import RunningServer

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = "smollm2-135m-instruct"  # in conftest's MODELS: declares 8192, loads at most 3072 (clamped)
SERVED = {KEY, "small-strict", "retriever"}


@pytest.fixture
def client(lmstudio: str):
    client = lms.Client(lmstudio.removeprefix("http://"))
    for model in client.llm.list_loaded():  # what earlier tests left (a JIT load stays, as in LM Studio)
        model.unload()
    yield client
    for model in client.llm.list_loaded():
        model.unload()
    client.close()


@pytest.fixture
def smol(client: lms.Client) -> lms.LLM:
    return client.llm.load_new_instance(KEY, "sdk-smol", config={"contextLength": 1024})


def test_downloaded_models_are_the_served_ones(client: lms.Client, lmstudio: str) -> None:
    listed = client.llm.list_downloaded()
    assert {m.model_key for m in listed} == SERVED
    assert {m["key"] for m in httpx.get(f"{lmstudio}/api/v1/models").json()["models"]} == SERVED
    info = next(m.info for m in listed if m.model_key == KEY)
    assert (info.type, info.format, info.max_context_length) == ("llm", "gguf", 8192)
    assert (info.architecture, info.params_string) == ("llama", "135M")  # read from the GGUF file
    # its path as LM Studio gives it: relative to the models folder, PUBLISHER/REPO/FILE
    assert info.path == f"local/{KEY}/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {m.model_key for m in client.list_downloaded_models()} == SERVED  # the system namespace
    assert client.list_downloaded_models("embedding") == []
    assert client.llm.list_loaded() == []


def test_load_new_instance_honours_identifier_config_gpu_and_ttl(client: lms.Client, lmstudio: str) -> None:
    model = client.llm.load_new_instance(KEY, "sdk-load", ttl=2, config={
        "contextLength": 1024, "gpu": {"ratio": 0.5}, "maxParallelPredictions": 2})
    info = model.get_info()
    assert (info.identifier, info.model_key, info.context_length, info.max_context_length) == (
        "sdk-load", KEY, 1024, 8192)
    assert model.get_context_length() == 1024
    config = model.get_load_config()
    assert (config.context_length, config.gpu.ratio) == (1024, 0.5)  # accepted and reported back
    # SDK 1.5's load config has no maxParallelPredictions: it drops the field without a word, so the
    # instance gets LM Studio's default (lmflow's backend sends the field itself)
    instances = [i for m in httpx.get(f"{lmstudio}/api/v1/models").json()["models"]
                 for i in m["loaded_instances"]]
    assert [(i["id"], i["config"]["parallel"]) for i in instances] == [("sdk-load", 4)]
    with pytest.raises(lms.LMStudioServerError, match="identifier 'sdk-load' already exists"):
        client.llm.load_new_instance(KEY, "sdk-load")
    time.sleep(2.5)  # idle past its TTL: unloaded, for SDK clients too
    assert client.llm.list_loaded() == []


def test_model_returns_the_loaded_instance_or_loads_one(client: lms.Client) -> None:
    with pytest.raises(lms.LMStudioClientError, match="no models are currently loaded"):
        client.llm.model()
    first = client.llm.load_new_instance(KEY, "sdk-first", config={"contextLength": 1024})
    again = client.llm.model(KEY, config={"contextLength": 2048})  # loaded: its config is not applied
    assert (again, again.get_context_length()) == (first, 1024)
    assert client.llm.model("sdk-first") == client.llm.model() == first
    assert client.llm.list_loaded() == [first]  # no second instance
    first.unload()
    loaded = client.llm.model(KEY)  # none loaded: loaded at the default 4096, clamped by this server
    assert (loaded.identifier, loaded.get_context_length()) == (KEY, 3072)
    with pytest.raises(lms.LMStudioServerError, match="Model not found: no/such-model"):
        client.llm.model("no/such-model")


def test_tokenize_count_tokens_and_prompt_template_are_the_models_own(smol: lms.LLM) -> None:
    assert smol.tokenize("Hello world") == [19556, 905]  # SmolLM2's tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 5
    tokens = smol.tokenize(text)
    assert all(isinstance(t, int) for t in tokens) and smol.count_tokens(text) == len(tokens) > 40
    assert smol.tokenize(["Hello", "world"]) == [smol.tokenize("Hello"), smol.tokenize("world")]
    prompt = smol.apply_prompt_template({"messages": [{"role": "user", "content": "What is 2+2?"}]})
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_respond_streams_the_answer_as_it_is_written(smol: lms.LLM) -> None:
    stream = smol.respond_stream("Count from 1 to 30.", config={"maxTokens": 20, "temperature": 0})
    fragments = list(stream)
    result = stream.result()
    assert result.content == "".join(fragment.content for fragment in fragments)
    stats = result.stats
    assert (stats.predicted_tokens_count, stats.stop_reason) == (20, "maxPredictedTokensReached")
    # a fragment for each token the model writes, not the answer in one piece (that each is relayed
    # while the model still writes: a cancel stops it, the next test)
    assert [fragment.tokens_count for fragment in fragments] == [1] * 20
    assert (result.model_info.model_key, result.load_config.context_length) == (KEY, 1024)
    assert (result.prediction_config.max_tokens, result.prediction_config.temperature) == (20, 0)


def test_a_cancelled_prediction_stops_generating(smol: lms.LLM) -> None:
    with smol.respond_stream("Write a long story about a cat.", config={"maxTokens": 200}) as stream:
        for count, _ in enumerate(stream, start=1):
            if count == 3:
                stream.cancel()
    stats = stream.result().stats
    assert stats.stop_reason == "userStopped" and stats.predicted_tokens_count < 200


def test_complete_is_a_raw_completion(smol: lms.LLM) -> None:
    prompt = "The capital of France is"
    stream = smol.complete_stream(prompt, config={"maxTokens": 5, "temperature": 0})
    fragments = list(stream)
    result = stream.result()
    assert len(fragments) > 1 and result.content.startswith(" Paris")
    # the prompt alone, no chat template around it
    assert result.stats.prompt_tokens_count == smol.count_tokens(prompt)
    assert result.stats.predicted_tokens_count == 5


def test_structured_output_follows_the_schema(smol: lms.LLM) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    result = smol.respond("What is 2+2? Answer in JSON.", response_format=schema,
                          config={"maxTokens": 20, "temperature": 0})
    jsonschema.validate(result.parsed, schema)
    assert result.parsed == json.loads(result.content)


def test_embedding_calls_say_there_is_no_embedding_model(client: lms.Client) -> None:
    assert client.embedding.list_loaded() == [] and client.embedding.list_downloaded() == []
    with pytest.raises(lms.LMStudioServerError,
                       match=r"Embedding model not found: nomic-embed \(this lmflow test server has no "):
        client.embedding.model("nomic-embed")
    with pytest.raises(lms.LMStudioServerError, match=f"'{KEY}' is an LLM, not an embedding model"):
        client.embedding.load_new_instance(KEY)
    with pytest.raises(lms.LMStudioModelNotFoundError, match="No embedding model is loaded"):
        lms.EmbeddingModel("nomic-embed", client.embedding).embed("hello")


def test_unserved_calls_are_answered_with_an_error_naming_them(
        client: lms.Client, smol: lms.LLM, lmstudio: str) -> None:
    with httpx.Client() as http, connect_ws(f"{lmstudio.replace('http', 'ws', 1)}/llm", http) as ws:
        ws.send_json({"authVersion": 1, "clientIdentifier": "raw", "clientPasskey": "raw"})
        assert ws.receive_json(timeout=5) == {"success": True}
        # an endpoint LM Studio has: refused at once, naming it
        ws.send_json({"type": "rpcCall", "endpoint": "preloadDraftModel", "callId": 7, "parameter": {}})
        assert ws.receive_json(timeout=5) == {"type": "rpcError", "callId": 7, "error": {
            "title": "Unsupported RPC endpoint 'preloadDraftModel' on /llm (lmflow test server)"}}
        ws.send_json({"type": "channelCreate", "endpoint": "completeRawText", "channelId": 3})
        assert ws.receive_json(timeout=5) == {"type": "channelError", "channelId": 3, "error": {
            "title": "Unsupported channel endpoint 'completeRawText' on /llm (lmflow test server)"}}
        # one LM Studio does not know either: its communication warning, and no answer
        ws.send_json({"type": "rpcCall", "endpoint": "noSuchCall", "callId": 8, "parameter": {}})
        ws.send_json({"type": "channelCreate", "endpoint": "noSuchChannel", "channelId": 4})
        assert [ws.receive_json(timeout=5) for _ in range(2)] == [
            {"type": "communicationWarning", "kind": "rpcEndpointUnknown",
             "warning": "Received rpcCall for unknown endpoint, endpoint = noSuchCall"},
            {"type": "communicationWarning", "kind": "channelEndpointUnknown",
             "warning": "Received channelCreate for unknown endpoint, endpoint = noSuchChannel"}]

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    # SmolLM2's own chat template has no tool support (test_testserver_sdk_tools.py)
    with pytest.raises(lms.LMStudioServerError, match="its chat template has no tool support"):
        smol.act("What is 1 + 2?", [add])


def test_a_token_protected_server_checks_the_auth_packet(
        lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    token = "sk-lm-abcDEF78:abcDEF7890abcDEF7890"  # LM Studio's form: sk-lm-IDENTIFIER:PASSKEY
    url = lmstudio_server_factory(models=MODELS, api_token=token).url
    # the test server's REST guard also wants the token on the websocket upgrade (the SDKs send
    # none: LM Studio checks their auth packet only), so this raw client sends both
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(headers=headers) as http:
        for passkey, answer in [("wrong", False), ("abcDEF7890abcDEF7890", True)]:
            with connect_ws(f"{url.replace('http', 'ws', 1)}/system", http) as ws:
                ws.send_json({"authVersion": 1, "clientIdentifier": "abcDEF78", "clientPasskey": passkey})
                reply = ws.receive_json(timeout=5)
                assert reply["success"] is answer
                if not answer:  # LM Studio's shape: the error is a string
                    assert "Invalid API token" in reply["error"]
    client = lms.Client(url.removeprefix("http://"))  # SDK 1.5 cannot be given a token
    try:
        with pytest.raises((lms.LMStudioError, ValueError)):  # ValueError: 1.5 on a string error
            client.list_downloaded_models()
    finally:
        client.close()


def test_unknown_names_are_the_errors_the_sdk_maps(client: lms.Client, smol: lms.LLM) -> None:
    with pytest.raises(lms.LMStudioModelNotFoundError, match="No loaded model satisfies"):
        client.llm.unload("no-such-instance")  # LM Studio: generic.noModelMatchingQuery
    with pytest.raises(lms.LMStudioPresetNotFoundError, match="No preset matching 'no such preset'"):
        smol.complete("Some text", preset="no such preset")
    assert client.llm.list_loaded() == [smol]


def publisher_models_folder(tmp_path: Path) -> Path:
    """A models folder laid out as LM Studio's (`publisher/repo/file.gguf`), two models linking the
    bundled one."""
    from lmflow.backends.catalog import locate

    gguf = locate(KEY, tmp_path)
    folder = tmp_path / "models"
    for path in ["hugging-quants/Llama-3.2-1B-Instruct-Q8_0-GGUF/llama-3.2-1b-instruct-q8_0.gguf",
                 "lmstudio-community/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1.gguf"]:
        (folder / path).parent.mkdir(parents=True)
        (folder / path).symlink_to(gguf)
    return folder


def test_a_models_folder_is_listed_and_resolved_as_lm_studio_does(
        lmstudio_server_factory: Callable[..., RunningServer], tmp_path: Path) -> None:
    folder = publisher_models_folder(tmp_path)
    server = lmstudio_server_factory(models=[], models_dir=str(folder))
    with lms.Client(server.host) as client:
        assert sorted((m.model_key, m.path) for m in client.llm.list_downloaded()) == [
            ("llama-3.2-1b-instruct",  # the key: the file name without its quantization
             "hugging-quants/Llama-3.2-1B-Instruct-Q8_0-GGUF/llama-3.2-1b-instruct-q8_0.gguf"),
            (KEY, "lmstudio-community/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1.gguf")]
        # publisher/model names the model, and then its loaded instance
        loaded = client.llm.load_new_instance("hugging-quants/llama-3.2-1b-instruct",
                                              config={"contextLength": 512})
        assert loaded.identifier == "llama-3.2-1b-instruct"
        assert client.llm.model("hugging-quants/llama-3.2-1b-instruct") == loaded
        assert client.llm.model("llama-3.2-1b-instruct") == loaded
        with pytest.raises(lms.LMStudioServerError, match="Model not found: hugging-quants/llama-4"):
            client.llm.load_new_instance("hugging-quants/llama-4")
        loaded.unload()


def test_a_discoverable_server_is_found_by_a_client_given_no_host(
        lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    server = lmstudio_server_factory(models=MODELS, discoverable=True)
    probed = [f"127.0.0.1:{port}" for port in lms.Client._DEFAULT_API_PORTS]
    assert server.sdk_host in probed
    # the SDK takes the first of its ports that answers: this server's, unless an LM Studio (or
    # another discoverable server) took an earlier one
    earlier = [h for h in probed[:probed.index(server.sdk_host)] if lms.Client.is_valid_api_host(h)]
    with lms.Client() as client:
        assert client.api_host == (earlier or [server.sdk_host])[0]
    with lms.Client(server.sdk_host) as client:
        assert {m.model_key for m in client.llm.list_downloaded()} == SERVED
