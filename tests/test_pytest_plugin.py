"""The `lmstudio_server` pytest plugin, used the way a user uses it: a test file of theirs run by
pytest in a subprocess (pytester), against the real server and real llama-server children."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The example of README's section on the fixture: run as it stands, so it cannot drift."""
    section = README.read_text().split("### In your own tests: the `lmstudio_server` fixture", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


USER_TESTS = '''
import re
from pathlib import Path

import httpx
import lmstudio
import psutil
import pytest

from lmflow.testing import pytest_plugin

KEY = "smollm2-135m-instruct"


def record(*pids):
    """For the outer test: processes that must be gone once this run is over."""
    with Path("pids.txt").open("a") as f:
        f.writelines(f"{pid}\\n" for pid in pids)


def test_the_sdk_sees_what_is_loaded(lmstudio_server):
    assert KEY in lmstudio_server.models and lmstudio_server.api_token is None
    client = lmstudio.Client(lmstudio_server.host)
    try:
        client.llm.load_new_instance(KEY, "mine", config={"contextLength": 1024})
        assert [m.identifier for m in client.llm.list_loaded()] == ["mine"]
        assert lmstudio_server.loaded() == {"mine": {"model": KEY, "context_length": 1024, "parallel": 4}}
        assert lmstudio_server.unload_all() == ["mine"]
        assert client.llm.list_loaded() == []
    finally:
        client.close()


def test_a_chat_completion_answers(lmstudio_server):
    lmstudio_server.reset_stats()
    reply = httpx.post(f"{lmstudio_server.url}/v1/chat/completions", timeout=120, json={
        "model": KEY, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].strip()
    assert lmstudio_server.stats()["chat_requests"] == 1
    assert list(lmstudio_server.loaded()) == [KEY]  # loaded just in time, left loaded on purpose
    engines = psutil.Process(lmstudio_server.pid).children(recursive=True)
    assert any("llama-server" in p.name() for p in engines)
    record(lmstudio_server.pid, *(p.pid for p in engines))


FACTORY = []  # the factory's server and its llama-server: stopped at the end of their test


def test_knobs_start_a_server_of_their_own(lmstudio_server_factory, lmstudio_server):
    server = lmstudio_server_factory(api_token="s3cret")
    assert server.pid != lmstudio_server.pid and KEY in server.models
    assert httpx.get(f"{server.url}/api/v1/models").status_code == 401
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, headers=server.headers, json={
        "model": KEY, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
    assert reply.status_code == 200 and server.headers == {"Authorization": "Bearer s3cret"}
    FACTORY.extend([server.pid, *(p.pid for p in psutil.Process(server.pid).children(recursive=True))])
    record(*FACTORY)
    with pytest.raises(TypeError, match="unknown lmstudio_server knob 'delay': knobs are .*delay_seconds"):
        lmstudio_server_factory(delay=1)


def test_the_factory_server_is_gone_after_its_test():
    assert len(FACTORY) == 2 and not any(psutil.pid_exists(p) for p in FACTORY)


def test_a_server_that_cannot_start(lmstudio_server_factory):
    lmstudio_server_factory(models=[{"key": "no-such-model"}])


def test_a_server_that_prints_no_url_in_time_is_stopped(lmstudio_server_factory, monkeypatch):
    monkeypatch.setattr(pytest_plugin, "START_TIMEOUT", 0.0)
    with pytest.raises(pytest.fail.Exception, match=r"\(pid \d+\) printed no URL within 0 s") as failed:
        lmstudio_server_factory()
    assert not psutil.pid_exists(int(re.search(r"pid (\d+)", str(failed.value))[1]))
'''


@pytest.mark.engine
@pytest.mark.slow
def test_a_users_tests_run_against_the_server_and_leave_no_process(pytester: pytest.Pytester) -> None:
    # run after the user's tests (file order): those expect the session server to have nothing loaded
    pytester.makepyfile(test_my_client=USER_TESTS, test_readme_example=readme_example())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=7, failed=1)
    # a server that fails to start: a pytest failure that shows why, not a hang
    result.stdout.fnmatch_lines(["*`lmflow testing serve` (pid *) exited with code * before it listened:*",
                                 "*'no-such-model' is not a bundled model*"])
    pids = [int(line) for line in (pytester.path / "pids.txt").read_text().split()]
    assert len(pids) == 4  # the session server and the factory's, a llama-server each
    assert [p for p in pids if running(p)] == []


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_fixtures_are_registered_for_every_project(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures")
    result.stdout.fnmatch_lines(["lmstudio_server *session*", "*LM Studio stand-in*",
                                 "lmstudio_server_factory -- *", "*starts a server with these knobs*"])


def test_loading_the_plugin_imports_neither_prefect_nor_lmstudio() -> None:
    # every pytest run of a project with lmflow loads it, whether or not a test uses a fixture
    probe = ("import sys, lmflow.testing.pytest_plugin\n"
             "print(sorted(m for m in ('prefect', 'lmstudio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]"
