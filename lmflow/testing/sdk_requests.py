"""What an SDK client asks for, read into what llama-server takes: LM Studio's KV config stacks,
its prediction fields as sampling parameters, chat histories as messages, prompt templates.

Read from the `lmstudio` SDK and lmstudio-js. A config travels as a stack of layers
(`{"layers": [{"layerName", "config": {"fields": [{key, value}]}}]}`), later layers winning; a
chat history is `{"messages": [{"role", "content": [parts]}]}` whose parts are text
(`{"type": "text", "text"}`) or files (`{"type": "file", "name", "identifier", "sizeBytes",
"fileType"}`, from the `/files` namespace: sdk_files.py). A failure is an `SdkError`, which the
session answers as LM Studio serializes errors.
"""

from __future__ import annotations

import json
from typing import Any


class SdkError(Exception):
    """A failure answered to the client as LM Studio serializes errors."""

    def __init__(self, title: str, display_data: dict[str, Any] | None = None):
        super().__init__(title)
        self.title = title
        self.display_data = display_data

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"title": self.title}
        if self.display_data:
            error["displayData"] = self.display_data
        return error


def collapse(stack: dict[str, Any] | None) -> dict[str, Any]:
    """A KV config stack as one mapping, later layers winning (as LM Studio collapses it)."""
    fields: dict[str, Any] = {}
    for layer in (stack or {}).get("layers") or []:
        for kv in (layer.get("config") or {}).get("fields") or []:
            fields[kv["key"]] = kv.get("value")
    return fields


def sampling(config: dict[str, Any]) -> dict[str, Any]:
    """llama-server's parameters for LM Studio's prediction fields (its /completion names)."""
    plain = {"temperature": "temperature", "topKSampling": "top_k", "stopStrings": "stop"}
    checkbox = {"maxPredictedTokens": "n_predict", "topPSampling": "top_p", "minPSampling": "min_p",
                "repeatPenalty": "repeat_penalty"}  # {"checked": bool, "value": ...}
    params: dict[str, Any] = {}
    for key, name in plain.items():
        if config.get(f"llm.prediction.{key}") is not None:
            params[name] = config[f"llm.prediction.{key}"]
    for key, name in checkbox.items():
        value = config.get(f"llm.prediction.{key}")
        if isinstance(value, dict) and value.get("checked"):
            params[name] = value.get("value")
    structured = config.get("llm.prediction.structured") or {}
    if structured.get("type") == "json":
        params["json_schema"] = structured.get("jsonSchema") or {}
    elif structured.get("type") == "gbnf":
        params["grammar"] = structured.get("gbnfGrammar") or ""
    template = config.get("llm.prediction.promptTemplate") or {}
    if template.get("stopStrings"):
        params["stop"] = [*params.get("stop", []), *template["stopStrings"]]
    return params


def chat_messages(history: dict[str, Any] | None, model: str) -> list[dict[str, Any]]:
    """The SDK's chat history as OpenAI-style messages for `model` (text parts joined).

    A file part that is an image is refused: no model here has vision. Other files (text,
    documents) are left out: LM Studio hands them to prompt preprocessors (its document plugin
    reads them into the prompt) and the model itself sees none (inferred: the SDK's suite expects a
    template rendered from a history with text files, and plugins that read documents say the model
    sees no document without them). The tool calls of an assistant message (`toolCallRequest`
    parts) are its `tool_calls`; each result of a tool message (`toolCallResult` parts) is a
    `tool` message of its own, as OpenAI's chats carry them.
    """
    messages: list[dict[str, Any]] = []
    for item in (history or {}).get("messages") or []:
        parts = item.get("content") or []
        for part in parts:
            if part.get("type") == "file" and part.get("fileType") == "image":
                raise SdkError(f"Model {model!r} cannot read images: it is not a vision model (the "
                               f"lmflow test server's models have no vision); image: {part.get('name')!r}")
        results = [part for part in parts if part.get("type") == "toolCallResult"]
        if results:
            messages += [{"role": "tool", "content": part.get("content", ""),
                          **({"tool_call_id": part["toolCallId"]} if part.get("toolCallId") else {})}
                         for part in results]
            continue
        text = "".join(part.get("text", "") for part in parts if part.get("type") == "text")
        message: dict[str, Any] = {"role": item.get("role", "user"), "content": text}
        calls = [part.get("toolCallRequest") or {} for part in parts if part.get("type") == "toolCallRequest"]
        if calls:
            message["tool_calls"] = [{
                "type": "function", **({"id": call["id"]} if call.get("id") else {}),
                "function": {"name": call.get("name", ""),
                             "arguments": json.dumps(call.get("arguments") or {})},
            } for call in calls]
        messages.append(message)
    return messages


def render_template(template: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """A prompt rendered with the client's own template (the SDK's `complete` sends one)."""
    if template.get("type") != "jinja":
        raise SdkError(f"{template.get('type')!r} prompt templates are not served by the lmflow "
                       "test server (jinja ones are)")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    jinja = template.get("jinjaPromptTemplate") or {}
    try:
        return ImmutableSandboxedEnvironment().from_string(jinja.get("template", "")).render(
            messages=messages, bos_token=jinja.get("bosToken", ""), eos_token=jinja.get("eosToken", ""),
            add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise SdkError(f"Error rendering the prompt template: {exc}") from None
