"""The real `lmstudio` SDK client against lmflow's LM Studio-compatible test server."""

from __future__ import annotations

from pathlib import Path

import lmstudio as lms
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = "smollm2-135m-instruct"


@pytest.fixture
def client(lmstudio: str):
    client = lms.Client(lmstudio.removeprefix("http://"))  # explicit, never the default client
    yield client
    for model in client.llm.list_loaded():
        model.unload()
    client.close()


def test_sdk_load_predict_unload_reload_with_one_client(client: lms.Client, lmstudio: str) -> None:
    import httpx

    httpx.post(f"{lmstudio}/lmflow/stats/reset").raise_for_status()
    assert client.llm.list_loaded() == []
    model = client.llm.load_new_instance(KEY, "coach", config={"contextLength": 2048})
    assert model.get_context_length() == 2048
    assert [m.identifier for m in client.llm.list_loaded()] == ["coach"]
    answer = model.respond("What is 2+2?", config={"maxTokens": 10, "temperature": 0})
    assert "4" in answer.content
    assert answer.stats.predicted_tokens_count and answer.stats.predicted_tokens_count <= 10
    model.unload()
    assert client.llm.list_loaded() == []
    again = client.llm.load_new_instance(KEY, "coach", config={"contextLength": 1024})
    assert again.get_context_length() == 1024
    assert again.respond("Say hi.", config={"maxTokens": 4}).content
    stats = httpx.get(f"{lmstudio}/lmflow/stats").json()
    assert stats["sdk_clients"] == 1  # one client, kept across the unload and reload
    assert (stats["chat_requests"], stats["max_in_flight_by_instance"]) == (2, {"coach": 1})


def test_sdk_sees_the_clamped_context(client: lms.Client) -> None:
    model = client.llm.load_new_instance(KEY, "big", config={"contextLength": 6000})
    assert model.get_context_length() == 3072


def test_sdk_unknown_model_is_a_server_error(client: lms.Client) -> None:
    with pytest.raises(lms.LMStudioError, match="Model not found: no/such-model"):
        client.llm.load_new_instance("no/such-model", "x")


def test_lmflow_loads_through_the_sdk_for_ttl_and_identifier(lmstudio: str) -> None:
    import time

    import httpx

    from lmflow.backends.base import ChatRequest
    from lmflow.backends.lmstudio import LMStudioBackend
    from lmflow.spec.model import ModelConfig, ServerConfig

    backend = LMStudioBackend(ServerConfig(name="default", backend="lmstudio", url=lmstudio))
    model = ModelConfig(alias="coach", key=KEY, context_length=2048, identifier="coach-a", ttl=1.0)
    try:
        info = backend.load(model)
        assert (info.instance_id, info.loaded_context_length) == ("coach-a", 2048)
        answer = backend.chat(ChatRequest(model=model, messages=[{"role": "user", "content": "hi"}],
                                          sampling={"max_tokens": 3}))
        assert answer.model == "coach-a"
        time.sleep(1.5)  # idle past its TTL: the server unloads it
        models = httpx.get(f"{lmstudio}/api/v1/models").json()["models"]
        assert all(m["loaded_instances"] == [] for m in models)
    finally:
        backend.close()


def test_load_model_step_passes_gpu_ttl_and_identifier(lmstudio: str) -> None:
    from lmflow.backends.lmstudio import LMStudioBackend
    from lmflow.spec.model import ModelConfig, Policy, ServerConfig
    from lmflow.steps import FixedModels, StepContext, get_kind

    backend = LMStudioBackend(ServerConfig(name="default", backend="lmstudio", url=lmstudio))
    model = ModelConfig(alias="c", key=KEY)
    ctx = StepContext(step_id="load", spec_dir=Path("."), session=FixedModels({"c": (backend, model)}),
                      policy=Policy(timeout=60))
    try:
        result = get_kind("load_model").run(
            {"model": "c", "identifier": "via-step", "gpu": "max", "ttl": "10m", "context_length": 1024},
            ctx)
        assert result.output["instance"] == "via-step"
        assert result.output["context_length"] == 1024
        assert "warnings" not in result.meta
    finally:
        backend.unload(ModelConfig(alias="c", key=KEY))
        backend.close()
