"""A scripted backend for tests, lmflow's and yours: the Backend seam with no server behind it.

`ScriptedBackend` is to lmflow's `Backend` what httpx's `MockTransport` is to a transport: a test
writes down what the server answers, runs the code under test, and asserts what was asked.

    backend = ScriptedBackend('{"n": 3}', ChatResponse(text='{"n": ', finish_reason="length"),
                              BackendUnreachable("no server answers", url=None))

Each chat takes the next reply, in order: a string is the answer's text, a `ChatResponse` the whole
answer, an exception is raised (a server that fails). A chat with no reply left raises
AssertionError, which no retry or fallback of lmflow takes for a server's failure. Or one function
answers every chat: `ScriptedBackend(respond=lambda request: ...)`, returning any of the same three.

What it was asked is kept: every chat's `ChatRequest` in `requests`, every `load` and `unload`
in `loads` and `unloads`. Loads succeed at the context asked; `models` (keys or `ModelInfo`s) is
what `list_models` answers; `health` is always True.

A step kind runs against it outside a spec through `lmflow.steps.FixedModels`:

    ctx = StepContext(step_id="s", spec_dir=tmp_path, session=FixedModels({"m": (backend, model)}))
    get_kind("prompt").run({"model": "m", "user": "hi"}, ctx)

A spec run in the test's own process (`lmflow.run`) uses it once it is registered under a kind of
the test's own (lmflow builds the backend from the spec's server, with no reply: override `reply`):

    @register_backend
    class Parrot(ScriptedBackend):
        kind = "parrot"                                   # server: {backend: parrot}

        def reply(self, request):
            return request.messages[-1]["content"]

Anything else a test needs of a server (its own token count, a load that fails): subclass and
override that method of `Backend`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ..backends.base import Backend, ChatRequest, ChatResponse, ModelInfo
from ..spec.model import ModelConfig, ServerConfig

#: what one chat answers: the text, the whole answer, or the error the server fails with
Reply = str | ChatResponse | BaseException


class ScriptedBackend(Backend):
    """A model server whose answers a test scripts, and which remembers what it was asked."""

    kind = "scripted"
    summary = "answers scripted by a test (lmflow.testing.fakes)"
    manages_models = True

    def __init__(self, *replies: Reply, respond: Callable[[ChatRequest], Reply] | None = None,
                 models: Sequence[str | ModelInfo] = (), config: ServerConfig | None = None):
        if replies and respond is not None:
            raise TypeError("ScriptedBackend takes replies or respond=, not both")
        super().__init__(config or ServerConfig(name="default", backend=self.kind))
        self.models = [ModelInfo(m) if isinstance(m, str) else m for m in models]
        self.requests: list[ChatRequest] = []
        self.loads: list[ModelConfig] = []
        self.unloads: list[ModelConfig] = []
        self._replies: deque[Reply] = deque(replies)
        self._respond = respond
        self._given = 0
        self._lock = threading.Lock()  # map items chat from several threads

    @classmethod
    def create(cls, config: ServerConfig, spec_dir: Path | None = None) -> ScriptedBackend:
        return cls(config=config)

    def reply(self, request: ChatRequest) -> Reply:
        """What one chat answers: `respond(request)` when given, else the next scripted reply."""
        if self._respond is not None:
            return self._respond(request)
        with self._lock:
            if not self._replies:
                raise AssertionError(
                    f"the scripted backend has no reply left for chat {self._given + 1} (it was given "
                    f"{self._given}): script one more, or answer every chat with respond=")
            self._given += 1
            return self._replies.popleft()

    def chat(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        with self.slots.hold(request.model):
            answer = self.reply(request)  # outside the lock: chats in parallel stay in parallel
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, str):
            return ChatResponse(text=answer, model=request.model.key)
        return answer

    def health(self) -> bool:
        return True

    def list_models(self) -> list[ModelInfo]:
        return list(self.models)

    def load(self, model: ModelConfig) -> ModelInfo:
        self.loads.append(model)
        return ModelInfo(model.key, loaded=True, loaded_context_length=model.context_length)

    def unload(self, model: ModelConfig, *, every: bool = False) -> list[str]:
        self.unloads.append(model)
        return []
