"""Tool use (`.act()`, tools in a prediction config) against lmflow's LM Studio test server.

The tools go to the instance's llama-server, which renders them with the model's chat template and
parses the calls the model writes. SmolLM2's own template has no tool support (llama.cpp drops the
tools), so a model given the test server's `chatml-tools` template is used; SmolLM2-135M, not
trained for tools, answers in prose rather than call one (the SDK's suite lists its tool tests for
that), so the events of a call are checked on what llama-server streamed for one (recorded).
"""

from __future__ import annotations

from collections.abc import Callable

import lmstudio as lms
import pytest

from lmflow.testing.pytest_plugin import RunningServer
from lmflow.testing.sdk_tools import ToolCallEvents

LLM = "smollm2-135m-instruct"
TOOLS_MODEL = "smollm2-tools"
MODELS = [{"key": LLM, "max_context_length": 2048},
          {"key": TOOLS_MODEL, "file": LLM, "max_context_length": 2048, "chat_template": "chatml-tools"}]
SHORT = {"maxTokens": 24, "temperature": 0}


def add(a: int, b: int) -> int:
    """Given two numbers a and b, returns the sum of them."""
    return a + b


@pytest.mark.engine
@pytest.mark.slow
def test_act_sends_the_tools_to_the_model_and_a_history_with_calls_renders_them(
        lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    server = lmstudio_server_factory(models=MODELS)
    with lms.Client(server.host) as client:
        model = client.llm.load_new_instance(TOOLS_MODEL, config={"contextLength": 2048})
        question = "What is the sum of 123 and 3210?"
        plain = model.respond(question, config=SHORT)
        predictions: list[lms.PredictionRoundResult] = []
        result = model.act(question, [add], config=SHORT, on_prediction_completed=predictions.append)
        assert result.rounds == len(predictions) >= 1
        # the tools reached the model: its prompt holds their description (the template's system
        # message), which the same question without tools does not
        assert predictions[0].stats.prompt_tokens_count > plain.stats.prompt_tokens_count + 50
        # a history with a call and its result (the next round of .act()) is rendered with them
        chat = lms.Chat()
        chat.add_user_message("What is 1 + 3?")
        chat.add_assistant_response("", [{"type": "toolCallRequest", "toolCallRequest": {
            "type": "function", "id": "call-1", "name": "add", "arguments": {"a": 1, "b": 3}}}])
        chat.add_tool_results([{"toolCallId": "call-1", "content": "4"}])
        prompt = model.apply_prompt_template(chat)
        assert ('<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 3}}\n'
                '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>'
                in prompt)
        again = model.respond(chat, config={**SHORT, "rawTools": {"type": "toolArray", "tools": [
            {"type": "function", "function": {"name": "add", "description": "Adds.", "parameters": {
                "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]}})
        assert again.stats.prompt_tokens_count > model.count_tokens(prompt) + 30  # the tools too
        model.unload()


@pytest.mark.engine
@pytest.mark.slow
def test_tools_for_a_model_whose_template_has_none_are_refused_naming_the_fix(
        lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    server = lmstudio_server_factory(models=MODELS)
    with lms.Client(server.host) as client:
        model = client.llm.load_new_instance(LLM, config={"contextLength": 1024})
        with pytest.raises(lms.LMStudioServerError,
                           match="its chat template has no tool support.*chat_template: chatml-tools"):
            model.act("What is 1 + 2?", [add], config=SHORT)
        model.unload()


#: what llama-server (with the chatml-tools template) streamed for a tool call after some text, its
#: arguments in two deltas (the call was prefilled as the start of an assistant message: SmolLM2
#: writes none itself)
RECORDED = [
    {"content": "Hi. "},
    {"tool_calls": [{"index": 0, "id": "wexD1LBs", "type": "function",
                     "function": {"name": "add", "arguments": '{"a": 1, "b": 3'}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]},
]


def test_streamed_tool_call_deltas_become_the_sdks_events() -> None:
    events = ToolCallEvents()
    calls = [call for delta in RECORDED for call in delta.get("tool_calls", [])]
    seen = [event for call in calls for event in events.delta(call)]
    assert seen == [
        {"type": "toolCallGenerationStart", "toolCallId": "wexD1LBs"},
        {"type": "toolCallGenerationNameReceived", "name": "add"},
        {"type": "toolCallGenerationArgumentFragmentGenerated", "content": '{"a": 1, "b": 3'},
        {"type": "toolCallGenerationArgumentFragmentGenerated", "content": "}"}]
    assert events.end() == [{"type": "toolCallGenerationEnd", "toolCallRequest": {
        "type": "function", "name": "add", "arguments": {"a": 1, "b": 3}, "id": "wexD1LBs"}}]
    assert events.end() == []  # nothing open
    # a second call starts by its index, ending the first; arguments that are not JSON fail it
    events.delta({"index": 0, "id": "c1", "function": {"name": "add", "arguments": '{"a": 1}'}})
    second = events.delta({"index": 1, "id": "c2", "function": {"name": "add", "arguments": '{"a":'}})
    assert [e["type"] for e in second] == ["toolCallGenerationEnd", "toolCallGenerationStart",
                                           "toolCallGenerationNameReceived",
                                           "toolCallGenerationArgumentFragmentGenerated"]
    failed = events.end()
    assert [(e["type"], e["error"]["title"]) for e in failed] == [
        ("toolCallGenerationFailed", "the arguments of tool call 'add' are not JSON")]
    # llama-server failing mid-call (the model broke the format): the call fails with its message
    events.delta({"index": 0, "id": "c3", "function": {"name": "add", "arguments": "{"}})
    assert events.fail("The model produced output that does not match the expected peg-native format") == [{
        "type": "toolCallGenerationFailed", "rawContent": '{"name": "add", "arguments": "{"}',
        "error": {"title": "The model produced output that does not match the expected peg-native format"}}]
