"""Parallel predictions: the test server's slots and counters, and lmflow's LM Studio backend using them.

Against the LM Studio-compatible test server (real llama-server children),
started the way users' own tests start it (lmflow's pytest plugin) and stopped by PID.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import lmstudio as lms
import psutil
import pytest
from conftest import MODELS, closing, wait_for
from lmstudio._sdk_models import LlmRpcGetLoadConfigParameter

from lmflow.backends.base import ChatRequest
from lmflow.backends.lmstudio import LMStudioBackend
from lmflow.spec.model import ModelConfig, ServerConfig
from lmflow.testing.pytest_plugin import RunningServer

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = "smollm2-135m-instruct"
ZEROED = {"chat_requests": 0, "in_flight": 0, "max_in_flight": 0, "max_in_flight_by_instance": {},
          "sdk_clients": 0}


def stats(url: str) -> dict:
    return httpx.get(f"{url}/lmflow/stats").json()


def reset(url: str) -> dict:
    return httpx.post(f"{url}/lmflow/stats/reset").json()


def instances(url: str) -> dict[str, dict]:
    """Loaded instances by id, with their config."""
    models = httpx.get(f"{url}/api/v1/models").json()["models"]
    return {i["id"]: {k: i["config"][k] for k in ("context_length", "parallel")}
            for m in models for i in m["loaded_instances"]}


def engine_cmdline(instance_id: str, server_pid: int | None = None) -> list[str]:
    """The command line of the llama-server serving an instance (the test server names it so);
    with `server_pid`, only that test server's children (others may serve the same key)."""
    alias = instance_id.replace(":", "-")
    found = []
    procs = psutil.Process(server_pid).children(recursive=True) if server_pid else psutil.process_iter()
    for proc in procs:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "--alias" in cmd and cmd[cmd.index("--alias") + 1] == alias:
            found.append(cmd)
    assert len(found) == 1, found
    return found[0]


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def chat(url: str, model: str = KEY) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code


def test_the_server_counts_requests_in_flight_and_loads_once_under_jit(
        lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    server = lmstudio_server_factory(models=MODELS, delay_seconds=1)
    url = server.url
    # six first requests at once: one JIT load, at LM Studio's default of 4 parallel predictions
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: chat(url), range(6)))
    assert codes == [200] * 6
    assert instances(url) == {KEY: {"context_length": 3072, "parallel": 4}}
    cmd = engine_cmdline(KEY, server.pid)
    assert (flag(cmd, "-np"), flag(cmd, "-c")) == ("4", str(4 * 3072))
    assert stats(url) == {"chat_requests": 6, "in_flight": 0, "max_in_flight": 6,
                          "max_in_flight_by_instance": {KEY: 6}, "sdk_clients": 0}
    assert reset(url) == ZEROED

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: chat(url), range(6)))
    assert codes == [200] * 6
    # the one-second delays overlapped: all six were in the server at once (counted, not timed)
    assert stats(url)["max_in_flight"] == 6

    # a streamed answer is counted too, and released once it ends
    reset(url)
    body = {"model": KEY, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as answer:
        assert answer.status_code == 200
        assert "data: [DONE]" in answer.read().decode()
    assert wait_for(lambda: stats(url)["in_flight"] == 0, timeout=60)
    assert stats(url) == {**ZEROED, "chat_requests": 1, "max_in_flight": 1,
                          "max_in_flight_by_instance": {KEY: 1}}


def backend(url: str) -> LMStudioBackend:
    return closing(LMStudioBackend(ServerConfig(name="default", backend="lmstudio", url=url)))


def test_lmflow_loads_a_model_with_parallel_predictions(lmstudio: str) -> None:
    b = backend(lmstudio)
    model = ModelConfig(alias="two", key=KEY, context_length=1024, parallel=2,
                        identifier=f"two-{uuid.uuid4().hex[:8]}")
    try:
        info = b.load(model)
        assert (info.instance_id, info.loaded_context_length) == (model.identifier, 1024)
        assert instances(lmstudio)[model.identifier] == {"context_length": 1024, "parallel": 2}
        assert b.loaded_parallel == {"two": 2}
        cmd = engine_cmdline(model.identifier)
        assert (flag(cmd, "-np"), flag(cmd, "-c")) == ("2", "2048")
        assert "-kvu" in cmd and flag(cmd, "--kv-unified-per-slot") == "1024"
        # the SDK's own view of the load config says the same
        specifier = {"type": "instanceReference", "instanceReference": model.identifier}
        with lms.Client(lmstudio.removeprefix("http://")) as client:
            config = client.llm.remote_call(
                "getLoadConfig", LlmRpcGetLoadConfigParameter._from_api_dict({"specifier": specifier}))
        assert {"key": "llm.load.numParallelSessions", "value": 2} in config["fields"]
        answer = b.chat(ChatRequest(model=model, messages=[{"role": "user", "content": "Say hi."}],
                                    sampling={"max_tokens": 3}))
        assert answer.model == model.identifier
    finally:
        b.unload(model)
        b.close()
    assert model.identifier not in instances(lmstudio)


def test_one_sdk_client_across_load_unload_load(lmstudio: str) -> None:
    b = backend(lmstudio)
    model = ModelConfig(alias="once", key=KEY, context_length=1024, parallel=2,
                        identifier=f"once-{uuid.uuid4().hex[:8]}")
    reset(lmstudio)
    try:
        b.load(model)
        client = b._sdk_client
        b.unload(model)
        b.load(model)
        assert b.version() == "0.4.0-lmflow-test build 1"  # another namespace, the same client
        assert b._sdk_client is client
        assert stats(lmstudio)["sdk_clients"] == 1
    finally:
        b.unload(model)
        b.close()


def test_threads_loading_at_once_share_one_sdk_client(lmstudio: str) -> None:
    b = backend(lmstudio)
    tag = uuid.uuid4().hex[:8]
    models = [ModelConfig(alias=f"m{n}", key=KEY, context_length=512, parallel=n, identifier=f"m{n}-{tag}")
              for n in (1, 2, 3)]
    reset(lmstudio)
    try:
        with ThreadPoolExecutor(3) as pool:
            infos = list(pool.map(b.load, models))
        assert [i.instance_id for i in infos] == [m.identifier for m in models]
        assert b.loaded_parallel == {"m1": 1, "m2": 2, "m3": 3}
        assert stats(lmstudio)["sdk_clients"] == 1
    finally:
        for model in models:
            b.unload(model)
        b.close()
    assert not {m.identifier for m in models} & set(instances(lmstudio))
