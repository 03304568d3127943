"""The loadable-context probe against the test server, whose limits are known."""

from __future__ import annotations

import math

import httpx
import pytest

from lmflow.backends.lmstudio import LMStudioBackend
from lmflow.probe import CLAMPED, LOAD_FAILED, probe_loadable, registry
from lmflow.spec.model import ModelConfig, ServerConfig

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def backend(url: str) -> LMStudioBackend:
    return LMStudioBackend(ServerConfig(name="default", backend="lmstudio", url=url))


def nothing_loaded(url: str) -> bool:
    return all(m["loaded_instances"] == [] for m in httpx.get(f"{url}/api/v1/models").json()["models"])


@pytest.mark.parametrize(("key", "truth", "failure"), [("small-strict", 2048, LOAD_FAILED),
                                                        ("smollm2-135m-instruct", 3072, CLAMPED)])
def test_finds_the_loadable_maximum_within_the_granularity(lmstudio: str, key: str, truth: int,
                                                           failure: str) -> None:
    b = backend(lmstudio)
    try:
        report = probe_loadable(b, ModelConfig(alias="p", key=key), granularity=256, fresh=True)
    finally:
        b.close()
    assert report.declared_max == 8192
    assert truth - 256 < report.loadable_max <= truth
    bound = math.ceil(math.log2((8192 - 1024) / 256)) + 3
    assert report.loads <= bound
    assert failure in {a.outcome for a in report.attempts}  # clamping is not a pass
    assert nothing_loaded(lmstudio)
    assert any(e["model"] == key and e["loadable_max"] == report.loadable_max for e in registry())


def test_an_interrupted_probe_resumes_without_loading_again(lmstudio: str) -> None:
    b = backend(lmstudio)
    model = ModelConfig(alias="p", key="small-strict")
    loads = []
    real_load = b.load
    b.load = lambda m: loads.append(m.context_length) or real_load(m)  # type: ignore[method-assign]

    def stop_after_two(attempt: object) -> None:
        if len(loads) == 2:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            probe_loadable(b, model, fresh=True, on_attempt=stop_after_two)
        assert nothing_loaded(lmstudio)
        first = list(loads)
        report = probe_loadable(b, model)
    finally:
        b.close()
    assert report.loadable_max == 2048
    assert not set(first) & set(loads[len(first):])  # the finished attempts were not repeated


def test_probe_command(lmstudio: str) -> None:
    import json

    from conftest import lmflow_cmd

    out = lmflow_cmd("probe", "small-strict", "--server", lmstudio, "--json", "--fresh")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["loadable_max"] == 2048
    listed = lmflow_cmd("probe", "--list")
    assert f"small-strict  {lmstudio}  loadable max 2048" in listed.stdout
    missing = lmflow_cmd("probe")
    assert missing.returncode == 2 and "give a MODEL key, or --list" in missing.stderr
