"""Tool use in the SDK's `predict` channel (`.act()`, `rawTools` in a prediction config), answered by
the instance's llama-server.

Read from the `lmstudio` 1.5 SDK (its PredictionEndpoint) and lmstudio-js's channel schema. A
prediction config's `llm.prediction.tools` is `{"type": "toolArray", "tools": [...], "force"?}`,
the tools in OpenAI's shape. While the model writes, the server sends `fragment`s for its text and,
for each tool call, `toolCallGenerationStart` (`toolCallId`), `toolCallGenerationNameReceived`
(`name`), `toolCallGenerationArgumentFragmentGenerated` (`content`) and then
`toolCallGenerationEnd` (`toolCallRequest`: `{type: "function", id, name, arguments}`) or
`toolCallGenerationFailed` (`error`). The client runs the tools and asks again with a history that
holds the calls and their results (sdk_requests.chat_messages).

llama-server does the work: its OpenAI chat route, given the tools, renders them into the prompt
with the model's chat template, constrains a tool call the model starts to the tools' schemas, and
streams it parsed, as OpenAI's `tool_calls` deltas, which `ToolCallEvents` turns into the events
above. A template without tool support makes llama-server drop the tools without a word (measured:
the same prompt, with or without them), so such a request is refused here naming the fix, where
LM Studio would fall back to its own default tool format (inferred from its docs: a system prompt
and `[TOOL_REQUEST]` markers it parses itself).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from .sdk_requests import SdkError

Send = Callable[[dict[str, Any]], Awaitable[None]]


def requested_tools(config: dict[str, Any]) -> dict[str, Any] | None:
    """The OpenAI `tools` (and `tool_choice`) a prediction config asks for; None for no tools."""
    setting = config.get("llm.prediction.tools") or {}
    if setting.get("type") != "toolArray" or not setting.get("tools"):
        return None
    asked: dict[str, Any] = {"tools": list(setting["tools"])}
    if setting.get("force"):
        asked["tool_choice"] = "required"
    return asked


class ToolCallEvents:
    """llama-server's streamed `tool_calls` deltas as the SDK's tool-call events: a call starts with
    the delta that gives its index (with its id and name), its arguments come in fragments, and it
    ends when the next call starts or the answer does."""

    def __init__(self) -> None:
        self.current: dict[str, Any] | None = None

    def delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        function = call.get("function") or {}
        if self.current is None or call.get("index", 0) != self.current["index"]:
            events += self.end()
            self.current = {"index": call.get("index", 0), "id": call.get("id"), "name": "", "arguments": ""}
            events.append({"type": "toolCallGenerationStart",
                           **({"toolCallId": call["id"]} if call.get("id") else {})})
        if function.get("name") and not self.current["name"]:
            self.current["name"] = function["name"]
            events.append({"type": "toolCallGenerationNameReceived", "name": function["name"]})
        if function.get("arguments"):
            self.current["arguments"] += function["arguments"]
            events.append({"type": "toolCallGenerationArgumentFragmentGenerated",
                           "content": function["arguments"]})
        return events

    def end(self) -> list[dict[str, Any]]:
        """The end of the call being written, if one is: its request, or its failure."""
        call, self.current = self.current, None
        if call is None:
            return []
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except ValueError:
            return self._failed(call, f"the arguments of tool call {call['name']!r} are not JSON")
        request = {"type": "function", "name": call["name"], "arguments": arguments,
                   **({"id": call["id"]} if call["id"] else {})}
        return [{"type": "toolCallGenerationEnd", "toolCallRequest": request}]

    def fail(self, message: str) -> list[dict[str, Any]]:
        """The call being written cannot be finished (the model broke its format): its failure."""
        call, self.current = self.current, None
        return self._failed(call, message) if call is not None else []

    @staticmethod
    def _failed(call: dict[str, Any], message: str) -> list[dict[str, Any]]:
        raw = json.dumps({"name": call["name"], "arguments": call["arguments"]})
        return [{"type": "toolCallGenerationFailed", "error": {"title": message}, "rawContent": raw}]


async def check_tool_support(http: httpx.AsyncClient, engine_url: str, instance_id: str) -> None:
    """Refuse tools for a model whose chat template has no tool support (llama-server would drop them)."""
    props = (await http.get(f"{engine_url}/props")).json()
    if not (props.get("chat_template_caps") or {}).get("supports_tools"):
        raise SdkError(
            f"Model {instance_id!r} cannot use tools here: its chat template has no tool support, so "
            "llama.cpp would leave the tools out of its prompt (the lmflow test server does not have LM "
            "Studio's default tool format); give the model a template with tools in the test server's "
            "config (`chat_template: chatml-tools` for a ChatML model)")


async def relay_with_tools(send: Send, cancelled: Callable[[], bool], http: httpx.AsyncClient,
                           engine_url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """A chat with tools by llama-server's OpenAI route, streamed as the SDK's fragments and tool-call
    events; its end (/completion's names, for the prediction stats) and the first token's time."""
    calls = ToolCallEvents()
    final: dict[str, Any] = {}
    first_token = None
    # a connection that carried this stream is not used again: once (not reproduced in 1 more run)
    # the next request after one failed with "Server disconnected without sending a response"
    request = http.build_request("POST", f"{engine_url}/v1/chat/completions", headers={"Connection": "close"},
                                 json={**body, "stream": True, "stream_options": {"include_usage": True},
                                       "cache_prompt": True})
    upstream = await http.send(request, stream=True)
    try:
        if upstream.status_code != 200:
            await upstream.aread()
            raise SdkError(_error_message(upstream.json()))
        async for line in upstream.aiter_lines():
            field_name, _, data = line.partition(":")
            data = data.strip()
            if field_name not in ("data", "error") or not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if field_name == "error" or "error" in chunk:
                if calls.current is None:
                    raise SdkError(_error_message(chunk))
                for event in calls.fail(_error_message(chunk)):
                    await send(event)
                break
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    first_token = first_token or time.monotonic()
                    await send({"type": "fragment", "fragment": {
                        "content": delta["content"], "tokensCount": 1, "containsDrafted": False,
                        "reasoningType": "none"}})
                for call in delta.get("tool_calls") or []:
                    first_token = first_token or time.monotonic()
                    for event in calls.delta(call):
                        await send(event)
                if choice.get("finish_reason"):
                    final["stop_type"] = "limit" if choice["finish_reason"] == "length" else "eos"
            if chunk.get("usage"):
                final.update(tokens_evaluated=chunk["usage"].get("prompt_tokens"),
                             tokens_predicted=chunk["usage"].get("completion_tokens"))
            if chunk.get("timings"):
                final["timings"] = chunk["timings"]
            if cancelled():
                break  # closing the stream stops llama-server's generation
        for event in calls.end():
            await send(event)
    finally:
        await upstream.aclose()
    return final, first_token


def _error_message(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    return str(error.get("message", error) if isinstance(error, dict) else error or payload)
