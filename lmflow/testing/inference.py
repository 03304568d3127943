"""How the test server answers a chat: through the llama-server of the instance that answers it.

Every chat request is admitted first (idle instances expire, the request is counted, the configured
faults strike), waits the configured delay, and is relayed to the instance's llama-server, which
gives real answers; a model with a configured flaw (a working limit past which it loses the start
of its prompt, or the retriever) is answered through `_degrade`. `Stats` counts the requests and
those in flight, for `GET /lmflow/stats`. The REST router (server.py), the SDK protocol (sdk_ws.py)
and the stateful chats (stateful_chat.py) all answer through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from .config import Behaviour
from .pool import Instance, InstancePool
from .refusals import Refusal, UpstreamError

CHAT = "/v1/chat/completions"  # llama-server's path (the one that applies the prompt template)


@dataclass
class Stats:
    """What the server has been asked, for tests of concurrency (all touched in the event loop only)."""

    chat_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    in_flight_by_instance: dict[str, int] = field(default_factory=dict)
    max_in_flight_by_instance: dict[str, int] = field(default_factory=dict)
    sdk_clients: set[str] = field(default_factory=set)

    def started(self, instance_id: str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        now = self.in_flight_by_instance[instance_id] = self.in_flight_by_instance.get(instance_id, 0) + 1
        self.max_in_flight_by_instance[instance_id] = max(
            self.max_in_flight_by_instance.get(instance_id, 0), now)

    def finished(self, instance_id: str) -> None:
        self.in_flight -= 1
        self.in_flight_by_instance[instance_id] -= 1

    @contextlib.contextmanager
    def answering(self, instance_id: str) -> Any:
        self.started(instance_id)
        try:
            yield
        finally:
            self.finished(instance_id)

    def reset(self) -> None:
        self.chat_requests = 0
        self.max_in_flight = self.in_flight
        self.max_in_flight_by_instance = {i: n for i, n in self.in_flight_by_instance.items() if n}
        self.sdk_clients.clear()

    def as_json(self) -> dict[str, Any]:
        return {"chat_requests": self.chat_requests, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "max_in_flight_by_instance": dict(self.max_in_flight_by_instance),
                "sdk_clients": len(self.sdk_clients)}


class Inference:
    """Chat requests' admission and their answers by the instances' llama-servers."""

    def __init__(self, behaviour: Behaviour, pool: InstancePool):
        self.behaviour = behaviour
        self.pool = pool
        self.stats = Stats()
        self._faults = random.Random(behaviour.error_seed)
        # llama-server closes a connection idle for 5 s, httpx keeps one for 5 s: a request sent on
        # one in that instant fails with "Server disconnected without sending a response"
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0),
                                      limits=httpx.Limits(keepalive_expiry=2.0))

    async def close(self) -> None:
        await self.http.aclose()

    async def admit(self) -> None:
        """What every chat request meets first: idle instances expire, the request is counted, and
        the configured faults strike."""
        await self.pool.expire()
        self.stats.chat_requests += 1
        if self.behaviour.crash_on_request == self.stats.chat_requests:
            os._exit(70)  # a crash in the middle of a request, like a real one
        if self.behaviour.error_rate and self._faults.random() < self.behaviour.error_rate:
            raise Refusal(self.behaviour.error_status, "injected fault (error_rate)")

    async def delay(self) -> None:
        """The configured slowness of every answer (concurrent requests wait together)."""
        if self.behaviour.delay_seconds:
            await asyncio.sleep(self.behaviour.delay_seconds)

    async def counted(self, events: Any, instance_id: str) -> Any:
        """`events`, the request counted in flight until the last one is sent."""
        try:
            async for event in events:
                yield event
        finally:
            self.stats.finished(instance_id)

    def _degraded(self, instance: Instance, path: str) -> bool:
        model = instance.model
        return path == CHAT and (model.working_context_length is not None or model.answers == "retriever")

    async def open_stream(self, instance: Instance, body: dict[str, Any], path: str = CHAT
                          ) -> AsyncIterator[dict[str, Any]]:
        """A streamed answer's chunks (model relabelled with the instance id); raises UpstreamError
        before the first one when llama-server refuses."""
        if self._degraded(instance, path):
            status, payload, body = await self._degrade(instance, {**body, "stream": False})
            if payload is not None:
                if status != 200:
                    raise UpstreamError(status, payload)
                return _as_chunks(payload)
            body = {**body, "stream": True}
        upstream = await self.http.send(self.http.build_request(
            "POST", f"{instance.engine.url}{path}", json=body), stream=True)
        if upstream.status_code != 200:
            await upstream.aread()
            await upstream.aclose()
            raise UpstreamError(upstream.status_code, upstream.json())
        return self._chunks(upstream, instance)

    async def _chunks(self, upstream: httpx.Response, instance: Instance) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in upstream.aiter_lines():
                field_name, _, data = line.partition(":")
                data = data.strip()
                if field_name == "error" and data:  # llama-server's way to fail a started stream
                    yield {"error": json.loads(data)}
                elif field_name == "data" and data and data != "[DONE]":
                    yield {**json.loads(data), "model": instance.id}
        finally:
            await upstream.aclose()

    async def complete(self, instance: Instance, body: dict[str, Any], path: str = CHAT
                       ) -> tuple[int, dict[str, Any]]:
        """An answer by the instance's llama-server (labelled with the instance id)."""
        instance.last_used = time.monotonic()
        if self._degraded(instance, path):
            status, payload, body = await self._degrade(instance, body)
            if payload is not None:
                return status, payload
        try:
            upstream = await self.http.post(f"{instance.engine.url}{path}", json=body)
        except httpx.HTTPError as exc:
            return 500, {"error": {"message": f"model crashed: {exc}"}}
        payload = upstream.json()
        if upstream.status_code == 200:
            payload["model"] = instance.id
        return upstream.status_code, payload

    async def _degrade(self, instance: Instance, body: dict[str, Any]
                       ) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
        """Apply the model's working limit (drop the oldest tokens) and the retriever mode."""
        model = instance.model
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        url = instance.engine.url
        tokens = (await self.http.post(f"{url}/tokenize", json={"content": text})).json()["tokens"]
        if len(tokens) > instance.context_length:
            return 400, {"error": {"message": (
                f"Trying to keep the first {len(tokens)} tokens when context the overflows. However, "
                f"the model is loaded with context length of only {instance.context_length} tokens")}}, body
        kept = text
        limit = model.working_context_length
        if limit is not None and len(tokens) > limit:
            kept = (await self.http.post(f"{url}/detokenize",
                                         json={"tokens": tokens[len(tokens) - limit:]})).json()["content"]
            body = {**body, "messages": [{"role": "user", "content": kept}]}
        if model.answers != "retriever":
            return 200, None, body
        found = re.search(r"pass key is (\d+)", kept)
        answer = found.group(1) if found else "I cannot find a pass key."
        return 200, {
            "id": "retriever", "object": "chat.completion", "model": instance.id,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 3,
                      "total_tokens": len(tokens) + 3},
        }, body


async def _as_chunks(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """A finished chat answer as the chunks of a streamed one."""
    text = payload["choices"][0]["message"]["content"]
    yield {"model": payload["model"], "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    yield {"model": payload["model"], "usage": payload.get("usage"), "choices": [
        {"index": 0, "delta": {}, "finish_reason": payload["choices"][0].get("finish_reason")}]}

