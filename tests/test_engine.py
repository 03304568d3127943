"""The managed local engine: a real llama-server with SmolLM2-135M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from lmflow import processes
from lmflow.backends.base import ChatRequest
from lmflow.errors import ContextOverflow

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


def test_engine_is_registered_while_running(engine) -> None:
    backend, _ = engine
    pids = [e.proc.pid for e in backend.engines.values()]
    registered = {int(p.stem) for p in (processes._registry()).glob("*.json")}
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
