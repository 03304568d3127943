"""LM Studio's stateful chats: its native `POST /api/v1/chat` and OpenAI's `POST /v1/responses`.

Shapes read from LM Studio's REST docs (chat, stateful chats, streaming events) and, for
`/v1/responses`, from the OpenAI Responses API that LM Studio 0.3.29+ implements.

Both answer with an id (`resp_` and 48 hex digits) under which the server keeps the conversation
so far; a request with `previous_response_id` continues it, and continuing an earlier id branches
it. With `store: false` nothing is kept (and the native chat's answer has no `response_id`). The
last STORE_LIMIT conversations are kept, in memory. A native chat keeps its system prompt until a
request gives another; a response's `instructions` are not carried over, as in OpenAI's API.

Streams are server-sent events `event: TYPE` / `data: {...}`:
- native: `chat.start`, `model_load.start|progress|end` (only when the chat loaded the model; the
  load is done before the stream starts, so they come at once), `prompt_processing.start|progress|
  end`, `message.start`, `message.delta`..., `message.end`, then `chat.end` with the whole result;
  a failure midway is an `error` event, still followed by `chat.end`;
- responses: `response.created`, `response.in_progress`, `response.output_item.added`,
  `response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
  `response.content_part.done`, `response.output_item.done`, `response.completed` (or
  `response.failed`), each with its `sequence_number`.

A native chat's `context_length` is the context of the load it causes (a model loaded already
answers at the context it has). Not served (refused, naming the parameter): images, MCP
integrations and tools (the bundled models have no vision and no tool training), reasoning other
than "off".
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .refusals import Refusal, UpstreamError, checked, json_body

if TYPE_CHECKING:
    from .inference import Inference
    from .pool import Instance, InstancePool

STORE_LIMIT = 1000

_NUMBER = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 1}
_RESPONSE_ID = {"type": "string", "pattern": "^resp_"}
NATIVE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"enum": ["message", "text", "image"]}, "content": {"type": "string"},
                           "data_url": {"type": "string"}}}}]},
        "system_prompt": {"type": "string"}, "integrations": {"type": "array"},
        "stream": {"type": "boolean"}, "temperature": _NUMBER, "top_p": _NUMBER,
        "top_k": {"type": "integer"}, "min_p": _NUMBER, "repeat_penalty": _NUMBER,
        "max_output_tokens": _COUNT, "reasoning": {"enum": ["off", "low", "medium", "high", "on"]},
        "context_length": _COUNT, "store": {"type": "boolean"}, "previous_response_id": _RESPONSE_ID}}
RESPONSES_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1}, "input": {"type": ["string", "array"]},
        "instructions": {"type": ["string", "null"]},
        "previous_response_id": {"anyOf": [_RESPONSE_ID, {"type": "null"}]},
        "stream": {"type": "boolean"}, "store": {"type": "boolean"},
        "max_output_tokens": {"anyOf": [_COUNT, {"type": "null"}]},
        "temperature": {"type": ["number", "null"]}, "top_p": {"type": ["number", "null"]},
        "tools": {"type": "array"}, "text": {"type": "object"}}}
#: sampling parameters both chats pass to llama-server under the same name
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


@dataclass
class Thread:
    """A conversation kept under a response id: its user and assistant turns, its system prompt."""

    messages: list[dict[str, str]]
    system: str | None = None


class Threads:
    """The conversations kept, by response id (the oldest dropped past `limit`)."""

    def __init__(self, limit: int = STORE_LIMIT):
        self.limit = limit
        self._kept: OrderedDict[str, Thread] = OrderedDict()

    def get(self, response_id: str | None) -> Thread | None:
        """The conversation up to `response_id` (none for None); a 404 for an id not kept."""
        if response_id is None:
            return None
        thread = self._kept.get(response_id)
        if thread is None:
            raise Refusal(404, f"Previous response with id {response_id!r} not found (the server keeps "
                               "the conversations it answered with store: true, in memory, while it runs)",
                          code="previous_response_not_found", param="previous_response_id")
        return thread

    def keep(self, thread: Thread, response_id: str | None = None) -> str:
        """Keep `thread` under `response_id` (a new one if None); the id."""
        response_id = response_id or new_id("resp")
        self._kept[response_id] = thread
        while len(self._kept) > self.limit:
            self._kept.popitem(last=False)
        return response_id


@dataclass
class Answer:
    """What the model answered, with the numbers both APIs report."""

    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    tokens_per_second: float | None = None
    first_token_seconds: float | None = None
    finish_reason: str | None = None

    def read_usage(self, chunk: dict[str, Any], seconds: float) -> None:
        usage, timings = chunk.get("usage") or {}, chunk.get("timings") or {}
        self.input_tokens = usage.get("prompt_tokens", self.input_tokens)
        self.output_tokens = usage.get("completion_tokens", self.output_tokens)
        speed = timings.get("predicted_per_second")
        if speed is None and self.output_tokens and seconds > 0:
            speed = self.output_tokens / seconds
        self.tokens_per_second = speed if speed is not None else self.tokens_per_second


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


class _Broken(Exception):
    """A stream that failed after it started."""


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def _with_system(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def native_turn(given: str | list[dict[str, Any]]) -> dict[str, str]:
    """The user message a native chat's `input` makes (its text items joined)."""
    if isinstance(given, str):
        return {"role": "user", "content": given}
    for i, item in enumerate(given):
        if item["type"] == "image":
            raise Refusal(400, "Images are not served by the lmflow test server (its models have no "
                               "vision)", param=f"input.{i}")
    return {"role": "user", "content": "\n".join(item.get("content", "") for item in given)}


def response_messages(given: str | list[Any]) -> list[dict[str, str]]:
    """The messages a Responses `input` makes (message items; text content parts)."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages = []
    for i, item in enumerate(given):
        if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
            raise Refusal(400, f"input[{i}]: the lmflow test server serves message items (role and "
                               "content) only", param=f"input[{i}]")
        role = "system" if item["role"] == "developer" else item["role"]
        if role not in ("user", "assistant", "system"):
            raise Refusal(400, f"input[{i}].role: {item['role']!r} is not a message role",
                          param=f"input[{i}].role")
        content = item.get("content")
        if isinstance(content, list):
            kinds = {part.get("type") if isinstance(part, dict) else None for part in content}
            if not kinds <= {"input_text", "output_text", "text"}:
                raise Refusal(400, f"input[{i}].content: only text parts are served (the lmflow test "
                                   "server's models read text only)", param=f"input[{i}].content")
            content = "".join(part.get("text", "") for part in content)
        if not isinstance(content, str):
            raise Refusal(400, f"input[{i}].content: a string or a list of text parts is expected",
                          param=f"input[{i}].content")
        messages.append({"role": role, "content": content})
    return messages


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """llama-server's response_format for a Responses `text.format` (json_schema or json_object)."""
    fmt = (text or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "response"), "schema": fmt.get("schema", {}),
            "strict": fmt.get("strict", False)}}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    return None


class StatefulChats:
    """The handlers of `/api/v1/chat` and `/v1/responses`, and the conversations they keep."""

    def __init__(self, pool: InstancePool, inference: Inference):
        self.pool = pool
        self.inference = inference
        self.threads = Threads()

    # -- answering (shared) -----------------------------------------------------------

    async def _answer(self, instance: Instance, body: dict[str, Any]) -> Answer:
        inference = self.inference
        with inference.stats.answering(instance.id):
            await inference.delay()
            started = time.monotonic()
            status, payload = await inference.complete(instance, body)
        if status != 200:
            raise UpstreamError(status, payload)
        choice = payload["choices"][0]
        answer = Answer(text=choice["message"].get("content") or "",
                        finish_reason=choice.get("finish_reason"))
        answer.read_usage(payload, time.monotonic() - started)
        prompt_ms = (payload.get("timings") or {}).get("prompt_ms")
        answer.first_token_seconds = prompt_ms / 1000 if prompt_ms is not None else time.monotonic() - started
        return answer

    async def _open(self, instance: Instance, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The upstream stream; the request is in flight until the response made of it ends."""
        inference = self.inference
        inference.stats.started(instance.id)
        chunks = None
        try:
            await inference.delay()
            chunks = await inference.open_stream(
                instance, {**body, "stream": True, "stream_options": {"include_usage": True}})
            return chunks
        finally:
            if chunks is None:  # refused: no response will end it
                inference.stats.finished(instance.id)

    @staticmethod
    async def _deltas(chunks: AsyncIterator[dict[str, Any]], answer: Answer) -> AsyncIterator[str]:
        """The text pieces of a stream, filling `answer` as they come."""
        started = time.monotonic()
        try:
            async for chunk in chunks:
                if "error" in chunk:
                    error = chunk["error"]
                    raise _Broken(error.get("message", error) if isinstance(error, dict) else error)
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        if answer.first_token_seconds is None:
                            answer.first_token_seconds = time.monotonic() - started
                        answer.text += delta
                        yield delta
                    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                answer.read_usage(chunk, time.monotonic() - started)
        except (httpx.HTTPError, ValueError) as exc:
            raise _Broken(f"the model stopped answering: {exc}") from None

    def _streamed(self, events: AsyncIterator[str], instance: Instance) -> StreamingResponse:
        return StreamingResponse(self.inference.counted(events, instance.id), media_type="text/event-stream")

    # -- POST /api/v1/chat ------------------------------------------------------------

    async def native(self, request: Request) -> Response:
        """LM Studio's native chat (stateful, with its own stats and stream events)."""
        await self.inference.admit()
        body = checked(await json_body(request), NATIVE_SCHEMA)
        if body.get("integrations"):
            raise Refusal(400, "Integrations (MCP servers, plugins) are not served by the lmflow test "
                               "server", kind="not_implemented", param="integrations")
        if body.get("reasoning", "off") != "off":
            raise Refusal(400, f"Model {body['model']!r} does not support the reasoning setting "
                               f"{body['reasoning']!r}", param="reasoning")
        previous = self.threads.get(body.get("previous_response_id"))
        history = [*(previous.messages if previous else []), native_turn(body["input"])]
        system = body.get("system_prompt", previous.system if previous else None)
        instance, load_seconds = await self.pool.instance_for(body["model"], body.get("context_length"))
        upstream = {"messages": _with_system(system, history), **{k: body[k] for k in SAMPLING if k in body}}
        if "max_output_tokens" in body:
            upstream["max_tokens"] = body["max_output_tokens"]

        def result(answer: Answer, store: bool = body.get("store", True)) -> dict[str, Any]:
            stats = {"input_tokens": answer.input_tokens, "total_output_tokens": answer.output_tokens,
                     "reasoning_output_tokens": 0, "tokens_per_second": answer.tokens_per_second or 0.0,
                     "time_to_first_token_seconds": round(answer.first_token_seconds or 0.0, 3)}
            if load_seconds is not None:
                stats["model_load_time_seconds"] = round(load_seconds, 3)
            done: dict[str, Any] = {"model_instance_id": instance.id,
                                    "output": [{"type": "message", "content": answer.text}], "stats": stats}
            if store:
                turn = {"role": "assistant", "content": answer.text}
                done["response_id"] = self.threads.keep(Thread([*history, turn], system))
            return done

        if not body.get("stream"):
            return JSONResponse(result(await self._answer(instance, upstream)))
        chunks = await self._open(instance, upstream)

        async def events() -> AsyncIterator[str]:
            yield _sse("chat.start", {"type": "chat.start", "model_instance_id": instance.id})
            if load_seconds is not None:
                loading = {"model_instance_id": instance.id}
                yield _sse("model_load.start", {"type": "model_load.start", **loading})
                yield _sse("model_load.progress", {"type": "model_load.progress", **loading, "progress": 1.0})
                yield _sse("model_load.end", {"type": "model_load.end", **loading,
                                              "load_time_seconds": round(load_seconds, 3)})
            yield _sse("prompt_processing.start", {"type": "prompt_processing.start"})
            answer, writing, store = Answer(), False, body.get("store", True)
            try:
                async for delta in self._deltas(chunks, answer):
                    if not writing:
                        for kind in ("prompt_processing.end", "message.start"):
                            yield _sse(kind, {"type": kind})
                        writing = True
                    yield _sse("message.delta", {"type": "message.delta", "content": delta})
                if not writing:
                    for kind in ("prompt_processing.end", "message.start"):
                        yield _sse(kind, {"type": kind})
                yield _sse("message.end", {"type": "message.end"})
            except _Broken as exc:
                error = {"type": "internal_error", "message": str(exc)}
                yield _sse("error", {"type": "error", "error": error})
                store = False  # a broken answer is not a conversation to continue
            yield _sse("chat.end", {"type": "chat.end", "result": result(answer, store)})

        return self._streamed(events(), instance)

    # -- POST /v1/responses -----------------------------------------------------------

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, as LM Studio serves it (text in, text out, stateful)."""
        await self.inference.admit()
        body = checked(await json_body(request), RESPONSES_SCHEMA)
        if body.get("tools"):
            raise Refusal(400, "Tools are not served by the lmflow test server (its models are not "
                               "trained for tool use)", param="tools")
        previous = self.threads.get(body.get("previous_response_id"))
        history = [*(previous.messages if previous else []), *response_messages(body["input"])]
        instance, _ = await self.pool.instance_for(body["model"])
        upstream: dict[str, Any] = {"messages": _with_system(body.get("instructions"), history)}
        upstream.update({k: body[k] for k in ("temperature", "top_p") if body.get(k) is not None})
        if body.get("max_output_tokens") is not None:
            upstream["max_tokens"] = body["max_output_tokens"]
        if fmt := response_format(body.get("text")):
            upstream["response_format"] = fmt
        response_id, message_id = new_id("resp"), new_id("msg")
        created = int(time.time())

        def response(answer: Answer | None, status: str) -> dict[str, Any]:
            """The response object (OpenAI's fields); `answer` None while it is being written."""
            out: dict[str, Any] = {
                "id": response_id, "object": "response", "created_at": created, "status": status,
                "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"), "model": instance.id, "output": [],
                "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True),
                "temperature": body.get("temperature"),
                "text": body.get("text") or {"format": {"type": "text"}},
                "tool_choice": "auto", "tools": [], "top_p": body.get("top_p"), "truncation": "disabled",
                "usage": None, "metadata": {}}
            if answer is None:
                return out
            if status == "incomplete":
                out["incomplete_details"] = {"reason": "max_output_tokens"}
            out["output"] = [message(answer.text, "completed" if status == "completed" else "incomplete")]
            out["usage"] = {"input_tokens": answer.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": answer.output_tokens,
                            "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": answer.input_tokens + answer.output_tokens}
            return out

        def message(text: str | None, status: str) -> dict[str, Any]:
            content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
            return {"id": message_id, "type": "message", "status": status, "role": "assistant",
                    "content": content}

        def finished(answer: Answer) -> dict[str, Any]:
            if body.get("store", True):
                self.threads.keep(Thread([*history, {"role": "assistant", "content": answer.text}]),
                                  response_id)
            return response(answer, "incomplete" if answer.finish_reason == "length" else "completed")

        if not body.get("stream"):
            return JSONResponse(finished(await self._answer(instance, upstream)))
        chunks = await self._open(instance, upstream)

        async def events() -> AsyncIterator[str]:
            sequence = iter(range(1 << 30))

            def event(kind: str, **data: Any) -> str:
                return _sse(kind, {"type": kind, "sequence_number": next(sequence), **data})

            at = {"item_id": message_id, "output_index": 0, "content_index": 0}
            yield event("response.created", response=response(None, "in_progress"))
            yield event("response.in_progress", response=response(None, "in_progress"))
            yield event("response.output_item.added", output_index=0, item=message(None, "in_progress"))
            yield event("response.content_part.added", **at,
                        part={"type": "output_text", "text": "", "annotations": []})
            answer = Answer()
            try:
                async for delta in self._deltas(chunks, answer):
                    yield event("response.output_text.delta", **at, delta=delta, logprobs=[])
            except _Broken as exc:
                failed = response(answer, "failed")
                failed["error"] = {"code": "server_error", "message": str(exc)}
                yield event("response.failed", response=failed)
                return
            part = {"type": "output_text", "text": answer.text, "annotations": []}
            yield event("response.output_text.done", **at, text=answer.text, logprobs=[])
            yield event("response.content_part.done", **at, part=part)
            done = finished(answer)
            yield event("response.output_item.done", output_index=0, item=done["output"][0])
            yield event("response.completed" if done["status"] == "completed" else "response.incomplete",
                        response=done)

        return self._streamed(events(), instance)
