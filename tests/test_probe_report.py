"""The probe's parts that need no model server: the verdict on an answer, the working search against
a scripted backend that answers in sentences, its journal, and the report for Prefect's UI."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from lmflow.backends.base import ChatRequest, ChatResponse
from lmflow.probe import FILLER, Attempt, ProbeReport, Trial, finds_key, probe_working
from lmflow.render.probe import report_markdown, working_text
from lmflow.spec.model import ModelConfig
from lmflow.testing.fakes import ScriptedBackend


def test_report_has_the_load_table_and_the_chart() -> None:
    report = ProbeReport(key={"model": "m", "server": "s"}, declared_max=8192, granularity=1024,
                         loadable_max=4096, working_max=2048,
                         attempts=[Attempt(1024, "ok", 1024, 0.5), Attempt(8192, "clamped", 4096, 0.7)],
                         trials=[Trial(1024, "start", "1", "ok", 1000, 0.5, "1"),
                                 Trial(2048, "start", "1", "ok", 2000, 1.25, "1"),
                                 Trial(3072, "start", "1", "wrong", 3000, 2.0, "I cannot | find it")])
    lines = report_markdown(report).splitlines()
    assert ("Works (pass key found at start, middle and end) up to 2048 prompt tokens at context 4096."
            in lines)
    assert "| 8192 | clamped | 4096 | 0.70 |" in lines
    assert "   1024 pass ############################## 2000 tok/s" in lines
    assert "   2048 pass ########################       1600 tok/s" in lines
    assert "   3072 FAIL ######################         1500 tok/s" in lines
    assert "| 3072 | start | wrong | 3000 |  | 2.00 | 1500.0 | I cannot \\| find it |" in lines


@pytest.mark.parametrize(("answer", "right"), [
    ("65210", True), ("The pass key is 65210.", True), ("pass key: 65210, remembered", True),
    ("165210", False), ("652101", False), ("The pass key is 6521.", False), ("", False)])
def test_a_trial_is_right_when_the_answer_states_the_key_as_a_whole_number(answer: str, right: bool) -> None:
    assert finds_key(answer, "65210") is right


def talkative(sentence: str = "The pass key is {key}.") -> Callable[[ChatRequest], ChatResponse]:
    """Answers a pass-key question with the key it read, in the sentence it is given (`{key}` in it),
    as chat models do; a prompt's tokens are its words."""

    def respond(request: ChatRequest) -> ChatResponse:
        prompt = request.messages[0]["content"]
        key = re.search(r"pass key is (\d+)", prompt).group(1)
        return ChatResponse(sentence.format(key=key), prompt_tokens=len(prompt.split()), seconds=0.01)

    return respond


MODEL = ModelConfig(alias="t", key="talkative")


def test_a_key_answered_in_a_sentence_is_right_and_the_answer_is_kept_whole() -> None:
    sentence = "I read the whole text carefully, and I am sure that the pass key is {key}."
    working, trials = probe_working(ScriptedBackend(respond=talkative(sentence)), MODEL, context_length=4096,
                                    granularity=1024)
    assert working == 3072  # the largest fill below 4096 less the answer's reserve
    assert trials and all(t.outcome == "ok" for t in trials)
    assert all(t.answer == sentence.format(key=t.key) for t in trials)  # not cut to 40 characters


def test_a_longer_number_holding_the_key_is_wrong() -> None:
    working, trials = probe_working(ScriptedBackend(respond=talkative("The pass key is 1{key}.")), MODEL,
                                    context_length=4096, granularity=1024)
    assert working is None
    assert [t.outcome for t in trials] == ["wrong"] * 3  # the smallest fill failed: the search stops


def test_verdicts_of_the_exact_match_rule_are_asked_again(tmp_path: Path) -> None:
    journal = tmp_path / "probe.jsonl"
    # what the exact-match rule wrote: a sentence judged wrong (cut to 40 characters), and no result
    old = Trial(1024, "start", "12345", "wrong", 1000, 0.5, "The pass key is 12345.")
    journal.write_text(json.dumps({"trial": asdict(old), "at_context": 4096}) + "\n"
                       + json.dumps({"working_max": None, "at_context": 4096}) + "\n")
    backend = ScriptedBackend(respond=talkative())
    working, _ = probe_working(backend, MODEL, context_length=4096, granularity=1024, journal=journal)
    assert working == 3072 and len(backend.requests) > 2  # not the old verdict replayed
    asked = len(backend.requests)
    again, trials = probe_working(backend, MODEL, context_length=4096, granularity=1024, journal=journal)
    assert (again, len(backend.requests)) == (3072, asked)  # this rule's verdicts replay without a question
    assert all(t.outcome == "ok" for t in trials)


def test_a_probe_that_found_no_working_context_says_so_plainly() -> None:
    report = ProbeReport(key={"model": "m", "server": "s"}, declared_max=8192, granularity=1024,
                         loadable_max=4096, working_max=None, attempts=[Attempt(4096, "ok", 4096, 0.5)],
                         trials=[Trial(1024, "start", "12345", "wrong", 1000, 0.5, "I cannot find it."),
                                 Trial(1024, "middle", "23456", "wrong", 1000, 0.5, "7"),
                                 Trial(1024, "end", "34567", "ok", 1000, 0.5, "34567")])
    said = working_text(report)
    assert said == (
        "NO WORKING CONTEXT FOUND at context 4096: even at the smallest fill, 1024 prompt tokens, the pass "
        "key was not returned at start, middle and end (start wrong, middle wrong, end ok). "
        "`context_length: probed` will refuse this record; \"probed: loadable\" loads at the loadable "
        "maximum (4096) instead")
    markdown = report_markdown(report)
    assert f"**{said}**." in markdown.splitlines()
    assert "None" not in markdown
    load_only = ProbeReport(key={"model": "m", "server": "s"}, declared_max=8192, granularity=1024,
                            loadable_max=4096)
    assert "None" not in report_markdown(load_only)
    assert "Working maximum not measured (load only, or nothing loads)." in report_markdown(load_only)


class Curving(ScriptedBackend):
    """Counts tokens as a server would, where a long prompt costs more per word than a short one
    (the line through two small calibration prompts then undershoots long fills). A subclass: the
    server's own count (`count_tokens`) is asked apart from any chat, so no reply can script it."""

    def __init__(self, counts: bool):
        super().__init__()
        self.counts = counts

    @staticmethod
    def tokens(text: str) -> int:
        words = len(text.split())
        return words + words * words // 40000

    def count_tokens(self, model: ModelConfig, text: str) -> int | None:
        return self.tokens(text) if self.counts else None

    def reply(self, request: ChatRequest) -> ChatResponse:
        answer = talkative()(request)
        answer.prompt_tokens = self.tokens(request.messages[0]["content"]) + 5  # 5: the chat template
        return answer


def test_fills_are_sized_by_the_servers_own_count_where_it_counts() -> None:
    """With count_tokens each fill is within a sentence of what it asks; with the calibration line
    alone the largest fills of this curving count miss by far more."""
    _, counted = probe_working(Curving(counts=True), MODEL, context_length=8192, granularity=1024)
    _, estimated = probe_working(Curving(counts=False), MODEL, context_length=8192, granularity=1024)
    sentence = len(FILLER.split())  # words, and so about the tokens, of one filler sentence
    assert counted and all(abs(t.prompt_tokens - t.fill) <= 2 * sentence for t in counted), [
        (t.fill, t.prompt_tokens) for t in counted]
    assert max(abs(t.prompt_tokens - t.fill) for t in estimated) > 4 * sentence
