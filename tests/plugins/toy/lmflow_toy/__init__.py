"""A backend from another package, registered the way any plugin is: an entry point in the group
`lmflow.backends` of its own package metadata (see lmflow_toy-0.1.dist-info/entry_points.txt).

It answers without a server: "toy heard: <the last user message>", shouted when its server says
`voice: shout`, an option only this backend has (lmflow merges it into the spec's schema).
"""

from __future__ import annotations

import time

from lmflow.backends import Backend, ChatRequest, ChatResponse, ModelInfo


class ToyBackend(Backend):
    kind = "toy"
    summary = "a test plugin that repeats what it is told"
    server_options = {"voice": {"enum": ["plain", "shout"], "description": "How the toy answers."}}

    def health(self) -> bool:
        return True

    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(key="parrot", loaded=True)]

    def chat(self, request: ChatRequest) -> ChatResponse:
        with self.slots.hold(request.model):
            started = time.monotonic()
            heard = next(m["content"] for m in reversed(request.messages) if m["role"] == "user")
            text = f"toy heard: {heard}"
            if self.config.options.get("voice") == "shout":
                text = text.upper()
            return ChatResponse(text=text, model=request.model.key, finish_reason="stop",
                                seconds=time.monotonic() - started)
