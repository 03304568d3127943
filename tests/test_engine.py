"""The managed local engine: a real llama-server with SmolLM2-135M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import wait_for

from lmflow import processes
from lmflow.backends.base import ChatRequest
from lmflow.backends.local import LocalBackend
from lmflow.errors import ContextOverflow, EngineError
from lmflow.spec.model import ModelConfig, ServerConfig

pytestmark = pytest.mark.engine


def test_plain_answer(engine) -> None:
    backend, model = engine
    response = backend.chat(ChatRequest(
        model=model, messages=[{"role": "user", "content": "What is 2+2? Answer with a number."}],
        sampling={"temperature": 0, "max_tokens": 10, "seed": 1}))
    assert "4" in response.text
    assert response.prompt_tokens and response.prompt_tokens > 5
    assert response.completion_tokens and response.completion_tokens <= 10


def test_json_schema_answer_is_valid(engine) -> None:
    backend, model = engine
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    response = backend.chat(ChatRequest(
        model=model, messages=[{"role": "user", "content": "Name a city and its country."}],
        sampling={"temperature": 0, "max_tokens": 40}, response_schema=schema))
    value = json.loads(response.text)
    assert set(value) == {"city", "country"}


def test_context_overflow_is_reported_with_token_counts(engine) -> None:
    backend, model = engine
    long_text = "apple banana cherry " * 600
    with pytest.raises(ContextOverflow) as info:
        backend.chat(ChatRequest(model=model, messages=[{"role": "user", "content": long_text}],
                                 sampling={"max_tokens": 5}))
    assert info.value.n_ctx and info.value.n_ctx <= 1024
    assert info.value.n_prompt and info.value.n_prompt > info.value.n_ctx


def test_engine_is_registered_while_running(engine, session_home: Path) -> None:
    backend, _ = engine
    pids = [e.proc.pid for e in backend.engines.values()]
    # the session's engine was started under the session's home (each test has its own)
    registered = {int(p.stem) for p in (session_home / "lmflow" / "pids").glob("*.json")}
    assert set(pids) <= registered


def test_reaper_stops_children_of_a_dead_owner() -> None:
    # an owner that starts a child and dies without stopping it
    code = ("import sys, time; from pathlib import Path; from lmflow import processes;"
            "p = processes.spawn([sys.executable, '-c', 'import time; time.sleep(120)'],"
            " log_path=Path(sys.argv[1]), label='sleeper'); print(p.pid, flush=True); time.sleep(120)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(processes._registry() / "x.log")],
                             stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    child_pid = int(owner.stdout.readline())
    try:
        owner.kill()
        owner.wait()
        # PDEATHSIG already ends the child on Linux; the reaper is the fallback elsewhere
        deadline = time.monotonic() + 5
        while psutil.pid_exists(child_pid) and time.monotonic() < deadline:
            if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        processes.reap_orphans()
        assert not (processes._registry() / f"{child_pid}.json").exists()
        alive = psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
        assert not alive
    finally:
        owner.stdout.close()
        if psutil.pid_exists(child_pid):
            psutil.Process(child_pid).kill()


def test_reaper_kills_a_child_whose_owner_is_gone(tmp_path) -> None:
    # without PDEATHSIG (other platforms), only the registry knows: simulate a dead owner
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"pid": child.pid, "label": "t", "args": [],
                  "create_time": psutil.Process(child.pid).create_time(),
                  "owner_pid": 999_999_999, "owner_create_time": 0.0}
        (processes._registry() / f"{child.pid}.json").write_text(json.dumps(record))
        assert processes.reap_orphans() == [child.pid]
        assert child.wait(5) is not None
    finally:
        child.kill()
        child.wait()


SMOL = "smollm2-135m-instruct"


def engines_of(alias: str) -> list[psutil.Process]:
    """The live llama-servers this test process started for a model alias."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if "--alias" in cmd and cmd[cmd.index("--alias") + 1] == alias:
            found.append(child)
    return found


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def ask(backend: LocalBackend, model: ModelConfig, text: str = "What is 2+2?", max_tokens: int = 4):
    return backend.chat(ChatRequest(model=model, messages=[{"role": "user", "content": text}],
                                    sampling={"temperature": 0, "max_tokens": max_tokens}))


def test_threads_racing_to_a_first_chat_start_one_engine_with_its_slots() -> None:
    backend = LocalBackend(ServerConfig(name="default"))
    model = ModelConfig(alias="race", key=SMOL, context_length=1024, parallel=2)
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: ask(backend, model), range(4)))
        assert all(a.completion_tokens for a in answers)
        [engine] = engines_of("race")
        cmd = engine.cmdline()
        # two slots of 1024 tokens each: a pool of 2048, unified, capped per slot
        assert (flag(cmd, "-np"), flag(cmd, "-c")) == ("2", "2048")
        assert "-kvu" in cmd and flag(cmd, "--kv-unified-per-slot") == "1024"
        # the pool's threads have ended; the engine must not have died with the one that started it
        time.sleep(0.5)
        assert engines_of("race") == [engine]
        assert ask(backend, model).completion_tokens
    finally:
        backend.close()
    assert engines_of("race") == []


def test_every_slot_holds_the_whole_context() -> None:
    backend = LocalBackend(ServerConfig(name="default"))
    model = ModelConfig(alias="slots", key=SMOL, context_length=1024, parallel=4)
    near_full = "apple banana cherry " * 290  # about 900 tokens
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: ask(backend, model, near_full), range(4)))
        assert all(850 < a.prompt_tokens < 1024 for a in answers), [a.prompt_tokens for a in answers]
        with pytest.raises(ContextOverflow) as info:
            ask(backend, model, "apple banana cherry " * 360)
        assert info.value.n_ctx == 1024  # what one request may use, not the pool
    finally:
        backend.close()


def load_in_thread(backend: LocalBackend, model: ModelConfig) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def load() -> None:
        try:
            outcome["info"] = backend.load(model)
        except EngineError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=load)
    thread.start()
    assert wait_for(lambda: engines_of(model.alias), timeout=60, interval=0.01), "no engine started"
    return thread, outcome


def test_close_while_an_engine_starts_leaves_none_running() -> None:
    backend = LocalBackend(ServerConfig(name="default"))
    model = ModelConfig(alias="closing", key=SMOL, context_length=512)
    thread, outcome = load_in_thread(backend, model)
    try:
        backend.close()
        thread.join(60)
        assert engines_of("closing") == []
        assert set(outcome) in ({"info"}, {"error"})  # finished before the close, or refused
        with pytest.raises(EngineError, match="its backend is closed"):
            backend.load(model)
    finally:
        backend.close()
        thread.join(60)


def test_unload_while_an_engine_starts_stops_it() -> None:
    backend = LocalBackend(ServerConfig(name="default"))
    model = ModelConfig(alias="unloading", key=SMOL, context_length=512)
    thread, outcome = load_in_thread(backend, model)
    try:
        backend.unload(model)  # waits for the start, then stops it
        thread.join(60)
        assert "info" in outcome
        assert engines_of("unloading") == []
        assert backend.engines == {}
    finally:
        backend.close()
        thread.join(60)
