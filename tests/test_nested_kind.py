"""A third party's kind can hold steps as the loop does: through the Step contract's `holds`,
`check_nested` and `StepContext.units`, with nothing about it in the validator or the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lmflow
from lmflow.steps import _REGISTRY
from lmflow.steps.base import Holds, Nest


class Rounds(lmflow.Step):
    """Run its steps `times` times; each round's steps see `lap.n` and `lap.last`."""

    kind = "rounds"
    cacheable = False
    holds = Holds(root="lap", fields=("n", "last"), group="round", options=("steps", "until"),
                  defined_in="a rounds step's steps and until",
                  sees_holder="a round sees its step as lap.n and lap.last",
                  from_outside="refer to steps.{holder}.output instead",
                  not_nested="repeat the inner steps in the outer round")
    options_schema = {
        "type": "object", "required": ["times", "steps"], "additionalProperties": False,
        "properties": {"times": {"type": "integer", "minimum": 1}, "until": {"type": "string"},
                       "steps": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/step"}}},
    }

    def check_nested(self, options: dict[str, Any], nest: Nest) -> dict[str, Any]:
        return {"steps": nest.steps(("steps",), options.get("steps")),
                "until": nest.condition(("until",), options.get("until"))}

    def run(self, options: dict[str, Any], ctx: lmflow.StepContext) -> lmflow.StepResult:
        assert ctx.units is not None and ctx.step is not None
        nested, last, answers = ctx.step.nested, None, []
        for n in range(options["times"]):
            outputs: dict[str, Any] = {}
            for step in nested["steps"]:
                names = ctx.units.names({"lap": {"n": n, "last": last}}, outputs)
                outcome = ctx.units.run(step, names, f"{ctx.step_id}#{n}.{step.id}")
                outputs[step.id] = outcome.output
                last = outcome.output
            answers.append(last)
            if nested["until"] is not None and nested["until"].test(
                    {"lap": {"n": n, "last": last}, "params": {}, "steps": {}}):
                break
        return lmflow.StepResult(answers)


@pytest.fixture
def rounds() -> Iterator[None]:
    lmflow.register(Rounds)
    try:
        yield
    finally:
        _REGISTRY.unregister("rounds")


def _spec(tmp_path: Path, steps: str) -> Path:
    (tmp_path / "roundhelp.py").write_text(
        "def double(x):\n    return x * 2\n\n\ndef add(x, y):\n    return x + y\n\n\n"
        "def start():\n    return 1\n")
    path = tmp_path / "rounds.yaml"
    path.write_text("version: 1\nname: rounds\n" + steps)
    return path


GOOD = """\
steps:
  - id: first
    python: {function: "roundhelp:start"}
  - id: again
    rounds:
      times: 3
      until: lap.last > 3
      steps:
        - id: plus
          python: {function: "roundhelp:add", args: {x: "${{ steps.first.output }}", y: "${{ lap.n }}"}}
        - id: keep
          python: {function: "roundhelp:double", args: {x: "${{ steps.plus.output }}"}}
"""


def test_a_third_party_kind_validates_its_held_steps_like_the_spec_s_own(
        rounds: None, tmp_path: Path) -> None:
    spec = lmflow.load_spec(_spec(tmp_path, GOOD))
    again = spec.step("again")
    assert [s.id for s in again.nested["steps"]] == ["plus", "keep"]
    assert [s.id for s in again.held] == ["plus", "keep"]
    assert spec.step("keep").parent == "again"  # held steps are found by id, as a checkpoint's are
    assert again.depends_on == ("first",)  # what held steps refer to outside is the holder's dependency
    assert "steps" not in again.options and "until" not in again.options  # its own, not run options
    assert again.nested["until"].test({"lap": {"n": 0, "last": 6}})


def test_a_third_party_kind_s_held_steps_get_the_messages_a_checkpoint_gets(
        rounds: None, tmp_path: Path) -> None:
    bad = """\
steps:
  - id: outside
    python: {function: "roundhelp:double", args: {x: "${{ lap.n }}"}}
  - id: again
    rounds:
      times: 2
      until: lap.nope > 1
      steps:
        - id: inner
          foreach: [1, 2]
          python: {function: "roundhelp:double", args: {x: "${{ steps.later.output }}"}}
        - id: later
          python: {function: "roundhelp:double", args: {x: "${{ lap.size }}"}}
        - id: deeper
          rounds: {times: 1, steps: [{id: z, python: {function: "roundhelp:start"}}]}
  - id: peek
    python: {function: "roundhelp:double", args: {x: "${{ steps.inner.output }}"}}
"""
    with pytest.raises(lmflow.SpecError) as info:
        lmflow.load_spec(_spec(tmp_path, bad))
    messages = [f"{p.path}: {p.message}" + (f" ({p.hint})" if p.hint else "") for p in info.value.problems]
    assert messages == [
        "steps[0].python.args.x: 'lap.n': lap is only defined in a rounds step's steps and until "
        "(refer to params or steps)",
        "steps[1].rounds.until: 'lap.nope': a lap reference is lap.FIELD (expected one of: last, n)",
        "steps[1].rounds.steps[0].foreach: 'foreach' is not available in a round "
        "(a round's steps run one after another, in the order written)",
        "steps[1].rounds.steps[0].python.args.x: step 'later' runs later in this round "
        "(a round's steps run in the order written)",
        "steps[1].rounds.steps[1].python.args.x: 'lap.size': a lap reference is lap.FIELD, "
        "FIELD one of n, last",
        "steps[1].rounds.steps[2].rounds: a rounds cannot run inside a round "
        "(repeat the inner steps in the outer round)",
        "steps[2].python.args.x: unknown step 'inner' ('inner' is a step of rounds 'again''s round: "
        "refer to steps.again.output instead)",
    ]


@pytest.mark.prefect
def test_a_third_party_kind_runs_its_held_steps_as_units(
        rounds: None, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmflow.prefect import server as prefect_server

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setattr(prefect_server, "_configured", None)
    result = lmflow.run(_spec(tmp_path, GOOD))
    assert result.ok, result.errors()
    # round 0: 1 + 0 = 1, doubled 2; round 1: 1 + 1 = 2, doubled 4 (4 > 3: `until` stops it)
    assert result.outputs()["again"] == [2, 4]
    assert {r.id: r.status for r in result.steps} == {"first": "completed", "again": "completed"}
