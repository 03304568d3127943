"""Embedding models of lmflow's LM Studio test server, through the real `lmstudio` 1.5 SDK and REST.

A model of the server's config with `type: embedding` is served by a llama-server started with
`--embeddings` (the bundled SmolLM2 here, mean-pooled: 576 dimensions); the SDK's `/embedding`
namespace and REST's embeddings routes answer with it, and an LLM is refused there (and it in chats).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from pathlib import Path

import httpx
import lmstudio as lms
import pytest

from lmflow.testing.pytest_plugin import RunningServer

LLM = "smollm2-135m-instruct"
EMBEDDER = "text-embedding-smollm2"
MODELS = [{"key": LLM, "max_context_length": 2048},
          {"key": EMBEDDER, "file": LLM, "type": "embedding", "max_context_length": 2048}]
DIMENSIONS = 576  # SmolLM2-135M's hidden size


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from lmflow.testing.pytest_plugin import running_lmstudio_server

    with running_lmstudio_server(tmp_path_factory.mktemp("embeddings"), models=MODELS) as running:
        yield running


@pytest.fixture
def client(server: RunningServer):
    with lms.Client(server.host) as client:
        yield client
        for model in [*client.llm.list_loaded(), *client.embedding.list_loaded()]:
            model.unload()


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


@pytest.mark.engine
@pytest.mark.slow
def test_an_embedding_model_is_listed_loaded_and_embeds_through_the_sdk(client: lms.Client) -> None:
    assert [m.model_key for m in client.embedding.list_downloaded()] == [EMBEDDER]
    assert [m.model_key for m in client.llm.list_downloaded()] == [LLM]
    info = client.embedding.list_downloaded()[0].info
    assert (info.type, info.path, info.max_context_length) == (
        "embedding", f"local/{EMBEDDER}/SmolLM2-135M-Instruct.Q4_1.gguf", 2048)
    model = client.embedding.load_new_instance(EMBEDDER)
    assert [m.identifier for m in client.embedding.list_loaded()] == [EMBEDDER]
    assert client.llm.list_loaded() == []  # each namespace sees its own type of model
    assert model.get_context_length() == 2048 and model.get_load_config().context_length == 2048
    vector = model.embed("Hello, world!")
    assert len(vector) == DIMENSIONS and math.isclose(_norm(vector), 1.0, rel_tol=1e-4)
    assert model.embed("Hello, world!") == vector  # the same input, the same vector
    pair = model.embed(["Hello, world!", "Goodbye, world!"])
    assert pair[0] == vector and pair[1] != vector and len(pair[1]) == DIMENSIONS
    # an embedding model's tokenize keeps the special tokens it embeds with; SmolLM2 adds none
    assert model.tokenize("Hello, world!") == [19556, 28, 905, 17]
    assert model.count_tokens("Hello, world!") == 4
    assert client.embedding.model() == client.embedding.model(EMBEDDER) == model


@pytest.mark.engine
@pytest.mark.slow
def test_each_namespace_refuses_the_other_type_of_model(client: lms.Client) -> None:
    with pytest.raises(lms.LMStudioServerError, match=f"'{LLM}' is an LLM, not an embedding model"):
        client.embedding.load_new_instance(LLM)
    with pytest.raises(lms.LMStudioServerError, match=f"'{EMBEDDER}' is an embedding model, not an LLM"):
        client.llm.model(EMBEDDER)
    with pytest.raises(lms.LMStudioModelNotFoundError, match="No loaded model satisfies"):
        client.embedding.unload("no-such-instance")


@pytest.mark.engine
@pytest.mark.slow
def test_rest_embeddings_are_the_sdks_and_an_embedding_model_does_not_chat(
        client: lms.Client, server: RunningServer) -> None:
    sdk_vector = client.embedding.model(EMBEDDER).embed("Hello, world!")
    for path in ["/v1/embeddings", "/api/v0/embeddings"]:
        body = {"model": EMBEDDER, "input": ["Hello, world!", "Bye"]}
        answer = httpx.post(f"{server.url}{path}", json=body, timeout=60).json()
        assert answer["object"] == "list" and answer["model"] == EMBEDDER
        assert [item["index"] for item in answer["data"]] == [0, 1]
        rest_vector = answer["data"][0]["embedding"]
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(rest_vector, sdk_vector, strict=True))
        assert answer["usage"]["prompt_tokens"] > 0
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": EMBEDDER, "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 400
    assert chat.json()["error"]["message"] == f"'{EMBEDDER}' is an embedding model, not an LLM"
    # REST lists it by its type: v1 `embedding`, v0 `embeddings` (as LM Studio's docs show)
    v1 = {m["key"]: m["type"] for m in httpx.get(f"{server.url}/api/v1/models").json()["models"]}
    v0 = {m["id"]: m["type"] for m in httpx.get(f"{server.url}/api/v0/models").json()["data"]}
    assert v1 == {LLM: "llm", EMBEDDER: "embedding"} and v0 == {LLM: "llm", EMBEDDER: "embeddings"}
    loaded = httpx.post(f"{server.url}/api/v1/models/load", json={"model": EMBEDDER, "context_length": 512},
                        timeout=60).json()
    assert (loaded["type"], loaded["status"]) == ("embedding", "loaded")
    httpx.post(f"{server.url}/api/v1/models/unload", json={"instance_id": loaded["instance_id"]}, timeout=60)


@pytest.mark.engine
@pytest.mark.slow
def test_a_models_folder_entry_makes_a_file_an_embedding_model_and_jit_loads_evict(
        lmstudio_server_factory: Callable[..., RunningServer], tmp_path: Path) -> None:
    from lmflow.backends.catalog import locate

    nomic = "nomic-ai/nomic-embed-text-v1.5-GGUF/nomic-embed-text-v1.5.Q4_K_M.gguf"
    folder = tmp_path / "models"
    for path in [nomic, "lmstudio-community/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q8_0.gguf"]:
        (folder / path).parent.mkdir(parents=True)
        (folder / path).symlink_to(locate(LLM, tmp_path))
    # the file is a chat model's: the entry says it is an embedding model, under LM Studio's key for it
    key = "text-embedding-nomic-embed-text-v1.5"
    server = lmstudio_server_factory(models=[{"key": key, "type": "embedding", "max_context_length": 2048}],
                                     models_dir=str(folder), jit_auto_evict=True)
    with lms.Client(server.host) as client:
        assert [(m.model_key, m.path) for m in client.embedding.list_downloaded()] == [(key, nomic)]
        embedder = client.embedding.model("nomic-ai/nomic-embed-text-v1.5", ttl=300)  # just in time
        assert embedder.identifier == key and len(embedder.embed("Hi")) == DIMENSIONS
        # LM Studio's "JIT models auto-evict": loading another model just in time unloads it
        llm = client.llm.model(LLM, ttl=300)
        assert client.embedding.list_loaded() == [] and client.llm.list_loaded() == [llm]
        with pytest.raises(lms.LMStudioModelNotFoundError):
            embedder.get_info()
        # a model loaded on purpose stays
        kept = client.embedding.load_new_instance(key)
        client.llm.unload(llm.identifier)
        client.llm.model(LLM)
        assert client.embedding.list_loaded() == [kept]
        for model in [*client.llm.list_loaded(), kept]:
            model.unload()


def _gguf_header(path: Path, architecture: str) -> None:
    """A GGUF file that declares an architecture and nothing else (no tensors): enough for a listing."""
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("general.architecture")
                     + struct.pack("<I", 8) + string(architecture))


def test_an_encoder_in_a_models_folder_is_an_embedding_model_keyed_as_lm_studio_does(tmp_path: Path) -> None:
    from lmflow.testing.config import load_behaviour

    _gguf_header(tmp_path / "models/nomic-ai/nomic-embed-text-v1.5-GGUF/nomic-embed-text-v1.5.Q4_K_M.gguf",
                 "nomic-bert")
    _gguf_header(tmp_path / "models/someone/Chat-GGUF/chat-model-Q4_K_M.gguf", "llama")
    config = tmp_path / "lmstudio.yaml"
    config.write_text("models_dir: models\n")
    models = {m.key: m.type for m in load_behaviour(config).models}
    assert models == {"text-embedding-nomic-embed-text-v1.5": "embedding", "chat-model": "llm"}
