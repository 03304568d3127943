"""Loop steps in specs: validation with positions, the graph around them, applying advice, the plan."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmflow import SpecError, load_spec
from lmflow.render.report import plan
from lmflow.spec.model import Spec, StepSpec
from lmflow.steps.loop.apply import apply_fields
from lmflow.steps.loop.report import analysis_line
from lmflow.steps.loop.spec import ApplyField

HELPERS = """\
def init(**kw):
    return {"rate": 0.1}


def generation(state, g):
    return {"best": 1.0 / g}


def f(**kw):
    return kw
"""


def write(tmp_path: Path, body: str) -> Path:
    """A spec whose body starts at line 3 (after version and name), with evo.py next to it."""
    (tmp_path / "evo.py").write_text(HELPERS)
    path = tmp_path / "s.yaml"
    path.write_text("version: 1\nname: t\n" + textwrap.dedent(body))
    return path


def load(tmp_path: Path, body: str) -> Spec:
    return load_spec(write(tmp_path, body))


def problems(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, body))
    return [p.render().replace(str(tmp_path) + "/", "") for p in caught.value.problems]


# ---------------------------------------------------------------- a valid loop


VALID = """\
models: {coach: {key: smollm2-135m-instruct}}
params: {n: 3}
steps:
  - id: target
    python: {function: "evo:f"}
  - id: evolve
    loop:
      generations: 10
      init: evo:init
      body: evo:generation
      until: loop.stats.best < steps.goal.output.best
      checkpoints:
        - at: [3, 6]
          every: 4
          history: 2
          mode: background
          steps:
            - id: ask
              prompt: {model: coach, user: "generation ${{ loop.generation }} of ${{ params.n }}"}
            - id: advise
              python:
                function: evo:f
                args: {answer: "${{ steps.ask.output }}", goal: "${{ steps.target.output }}"}
          apply:
            rate: {from: advice.rate, min: 0.001, max: 0.5, bounds: reject}
            crossover: {enum: [uniform, blend]}
            size: null
        - every: 5
          steps:
            - id: note
              python: {function: evo:f}
  - id: goal
    python: {function: "evo:f"}
  - id: result
    python: {function: "evo:f", args: {loop: "${{ steps.evolve.output.state }}"}}
"""


def test_a_valid_loop_loads_with_its_checkpoints(tmp_path: Path) -> None:
    spec = load(tmp_path, VALID)
    loop = spec.step("evolve").nested
    assert loop is not None
    first, second = loop.checkpoints
    assert (first.index, first.at, first.every, first.history, first.mode) == (0, (3, 6), 4, 2, "background")
    assert first.apply == (
        ApplyField(target="rate", source="advice.rate", minimum=0.001, maximum=0.5, bounds="reject"),
        ApplyField(target="crossover", source="crossover", enum=("uniform", "blend")),
        ApplyField(target="size", source="size"),
    )
    assert [s.id for s in first.steps] == ["ask", "advise"]
    assert all(isinstance(s, StepSpec) and s.parent == "evolve" for s in first.steps)
    assert [s.kind for s in first.steps] == ["prompt", "python"]
    # a checkpoint without history, mode or apply: the loop's history (default 5), blocking, records only
    assert (second.at, second.every, second.history, second.mode, second.apply) == (
        (), 5, 5, "blocking", None)
    assert first.due(3) and first.due(8) and not first.due(5) and second.due(10)


def test_checkpoint_steps_are_found_by_id_but_are_not_top_level_steps(tmp_path: Path) -> None:
    spec = load(tmp_path, VALID)
    assert spec.step("advise").parent == "evolve"
    assert spec.step("advise").options["function"] == "evo:f"
    assert spec.step("target").parent is None
    assert [s.id for s in spec.steps] == ["target", "goal", "evolve", "result"]


def test_what_a_loop_refers_to_makes_its_dependencies(tmp_path: Path) -> None:
    spec = load(tmp_path, VALID)
    # `target` through a checkpoint's step, `goal` (written after the loop) through until
    assert set(spec.step("evolve").depends_on) == {"target", "goal"}
    assert spec.step("result").depends_on == ("evolve",)
    # inside a checkpoint the order is the written one: no dependencies between its steps
    assert spec.step("advise").depends_on == ()
    assert spec.step("evolve").nested.until.test(
        {"loop": {"stats": {"best": 0.1}}, "steps": {"goal": {"output": {"best": 0.5}}}, "params": {}})


def test_a_loop_uses_the_models_of_its_checkpoints_between_load_and_unload(tmp_path: Path) -> None:
    spec = load(tmp_path, """\
        models: {coach: {key: smollm2-135m-instruct}}
        steps:
          - id: load
            load_model: {model: coach}
          - id: evolve
            loop:
              generations: 10
              init: evo:init
              body: evo:generation
              checkpoints:
                - every: 5
                  steps:
                    - id: advise
                      prompt: {model: coach, user: "${{ loop.history }}"}
          - id: unload
            unload_model: {model: coach}
    """)
    assert spec.step("evolve").depends_on == ("load",)
    assert "evolve" in spec.step("unload").depends_on
    assert [s.id for s in spec.steps] == ["load", "evolve", "unload"]


# ---------------------------------------------------------------- errors


def test_a_loop_must_stop_and_its_functions_must_import(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: forever
            loop:
              init: evo:init
              body: evo:generation
              checkpoints:
                - steps: [{id: a, python: {function: "evo:f"}}]
          - id: missing
            loop:
              generations: 3
              init: {function: evo:init}
              body: nowhere:generation
    """) == [
        "s.yaml:6:7: steps[0].loop: a loop needs generations, until or max_seconds (else it never ends) "
        "(e.g. generations: 200)",
        "s.yaml:9:11: steps[0].loop.checkpoints[0]: a checkpoint needs at: or every: "
        "(e.g. every: 5, which runs at 5, 10, 15...)",
        "s.yaml:14:13: steps[1].loop.body: module 'nowhere' not found "
        "(put it next to the spec or install it)",
    ]


def test_loop_references_are_only_defined_in_checkpoints(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: top
            python: {function: evo:f, args: {g: "${{ loop.generation }}"}}
          - id: evolve
            loop:
              generations: 3
              init: evo:init
              body: evo:generation
              checkpoints:
                - every: 1
                  steps:
                    - id: a
                      python: {function: evo:f, args: {g: "${{ loop.nope }}"}}
    """) == [
        "s.yaml:5:41: steps[0].python.args.g: 'loop.generation': loop is only defined in a loop's "
        "checkpoint and until (refer to params or steps)",
        "s.yaml:15:51: steps[1].loop.checkpoints[0].steps[0].python.args.g: 'loop.nope': a loop reference "
        "is loop.FIELD, FIELD one of generation, generations, state, stats, history, previous, asked_at",
    ]


def test_a_checkpoint_runs_its_steps_in_the_order_written(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: evolve
            loop:
              generations: 3
              init: evo:init
              body: evo:generation
              checkpoints:
                - every: 1
                  steps:
                    - id: first
                      python: {function: evo:f, args: {x: "${{ steps.second.output }}"}}
                    - id: second
                      python: {function: evo:f}
    """) == [
        "s.yaml:13:51: steps[0].loop.checkpoints[0].steps[0].python.args.x: step 'second' runs later in "
        "this checkpoint (a checkpoint's steps run in the order written)",
    ]


def test_step_ids_are_unique_across_checkpoints(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: advise
            python: {function: evo:f}
          - id: evolve
            loop:
              generations: 3
              init: evo:init
              body: evo:generation
              checkpoints:
                - every: 1
                  steps:
                    - id: advise
                      python: {function: evo:f}
    """) == [
        "s.yaml:14:19: steps[1].loop.checkpoints[0].steps[0].id: duplicate step id 'advise', "
        "first given at steps[0] (line 4) (step ids must be unique: rename one)",
    ]


def test_foreach_after_and_loops_are_not_available_in_a_checkpoint(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: evolve
            loop:
              generations: 3
              init: evo:init
              body: evo:generation
              checkpoints:
                - every: 1
                  steps:
                    - id: each
                      foreach: [1, 2]
                      python: {function: evo:f}
                    - id: later
                      after: [each]
                      python: {function: evo:f}
                    - id: inner
                      loop: {generations: 2, init: evo:init, body: evo:generation}
    """) == [
        "s.yaml:13:15: steps[0].loop.checkpoints[0].steps[0].foreach: 'foreach' is not available in a "
        "checkpoint (a checkpoint's steps run one after another, in the order written)",
        "s.yaml:16:15: steps[0].loop.checkpoints[0].steps[1].after: 'after' is not available in a "
        "checkpoint (a checkpoint's steps run one after another, in the order written)",
        "s.yaml:19:15: steps[0].loop.checkpoints[0].steps[2].loop: a loop cannot run inside a checkpoint "
        "(put the inner loop's work in its body function)",
    ]


CHECKPOINT_STEP_REFERRED_TO = """\
steps:
  - id: evolve
    loop:
      generations: 3
      init: evo:init
      body: evo:generation
      checkpoints:
        - every: 1
          steps:
            - id: advise
              python: {function: evo:f}
        - every: 2
          steps:
            - id: other
              python: {function: evo:f, args: {x: "${{ steps.advise.output }}"}}
  - id: after
    python: {function: evo:f, args: {x: "${{ steps.advise.output }}"}}
"""


def test_a_checkpoint_step_is_not_visible_outside_its_checkpoint(tmp_path: Path) -> None:
    assert problems(tmp_path, CHECKPOINT_STEP_REFERRED_TO) == [
        "s.yaml:17:51: steps[0].loop.checkpoints[1].steps[0].python.args.x: unknown step 'advise' "
        "('advise' belongs to another checkpoint: a checkpoint sees its own steps, the top-level steps "
        "and loop.*)",
        "s.yaml:19:41: steps[1].python.args.x: unknown step 'advise' ('advise' is a step of loop "
        "'evolve''s checkpoint: refer to the loop's output instead, e.g. steps.evolve.output.analyses)",
    ]


def test_until_is_a_checked_condition(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: broken
            loop: {generations: 3, init: evo:init, body: evo:generation, until: "loop.stats.best <"}
          - id: mapped
            loop: {generations: 3, init: evo:init, body: evo:generation, until: "item.x > 1"}
    """) == [
        "s.yaml:5:91: steps[0].loop.until: invalid condition: invalid expression: invalid syntax",
        "s.yaml:7:74: steps[1].loop.until: invalid condition: unknown name 'item' "
        "(names here: loop, params, steps) (item and index are only defined in a step with foreach)",
    ]


def test_apply_min_above_max(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: evolve
            loop:
              generations: 3
              init: evo:init
              body: evo:generation
              checkpoints:
                - every: 1
                  steps: [{id: advise, python: {function: evo:f}}]
                  apply:
                    sigma: {min: 0.1}
                    rate: {min: 0.5, max: 0.1}
    """) == ["s.yaml:14:25: steps[0].loop.checkpoints[0].apply.rate.min: min 0.5 is above max 0.1"]


def test_an_unknown_key_in_a_checkpoint_step_is_reported_at_its_path(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: evolve
            loop:
              generations: 3
              init: evo:init
              body: evo:generation
              checkpoints:
                - every: 1
                  steps:
                    - id: advise
                      python: {function: evo:f, agrs: {}}
    """) == [
        "s.yaml:13:41: steps[0].loop.checkpoints[0].steps[0].python.agrs: unknown key 'agrs' "
        "(did you mean 'args'?)",
    ]


# ---------------------------------------------------------------- applying advice


def field(target: str, source: str | None = None, **rule: Any) -> ApplyField:
    return ApplyField(target=target, source=source or target, **rule)


def test_values_outside_the_bounds_are_clamped_or_rejected() -> None:
    state = {"rate": 0.1, "sigma": 1.0, "size": 8}
    changes = apply_fields(state, {"rate": 0.9, "sigma": -2, "size": 100}, (
        field("rate", minimum=0.001, maximum=0.5),
        field("sigma", minimum=0.01, maximum=2.0),
        field("size", minimum=1, maximum=50, bounds="reject"),
    ))
    assert changes == [
        {"field": "rate", "raw": 0.9, "status": "clamped", "note": "0.9 is above max 0.5: clamped",
         "previous": 0.1, "value": 0.5},
        {"field": "sigma", "raw": -2, "status": "clamped", "note": "-2 is below min 0.01: clamped",
         "previous": 1.0, "value": 0.01},
        {"field": "size", "raw": 100, "status": "rejected", "note": "100 is above max 50"},
    ]
    assert state == {"rate": 0.5, "sigma": 0.01, "size": 8}


def test_numeric_strings_are_read_as_numbers_and_other_values_rejected() -> None:
    state = {"rate": 0.1, "sigma": 1.0, "mu": 2.0, "nu": 3.0, "flag": 4.0}
    changes = apply_fields(state, {"rate": " 0.25 ", "sigma": "lots", "mu": math.nan, "nu": "inf",
                                   "flag": True}, tuple(field(k) for k in state))
    assert math.isnan(changes[2].pop("raw"))  # NaN equals nothing, itself included
    assert changes == [
        {"field": "rate", "raw": " 0.25 ", "status": "normalised", "note": "' 0.25 ' read as a number",
         "previous": 0.1, "value": 0.25},
        {"field": "sigma", "raw": "lots", "status": "rejected", "note": "'lots' is not a number"},
        {"field": "mu", "status": "rejected", "note": "nan is not a number"},
        {"field": "nu", "raw": "inf", "status": "rejected", "note": "'inf' is not a number"},
        {"field": "flag", "raw": True, "status": "rejected", "note": "True is not a number"},
    ]
    assert state == {"rate": 0.25, "sigma": 1.0, "mu": 2.0, "nu": 3.0, "flag": 4.0}


def test_integer_fields_stay_integers() -> None:
    state = {"a": 10, "b": 10, "c": 10}
    changes = apply_fields(state, {"a": 12.6, "b": "12", "c": 11.0}, (field("a"), field("b"), field("c")))
    assert [(c["status"], c["value"], c.get("note")) for c in changes] == [
        ("normalised", 13, "12.6 rounded to 13"),
        ("normalised", 12, "'12' read as a number"),
        ("applied", 11, None),
    ]
    assert state == {"a": 13, "b": 12, "c": 11}
    assert all(type(v) is int for v in state.values())


def test_enum_lists_ignore_case_dashes_underscores_and_spaces() -> None:
    state = {"target": "sigma", "crossover": "blend"}
    fields = (field("target", enum=("mutation-rate", "sigma")),
              field("crossover", enum=("one_point", "blend")))
    changes = apply_fields(state, {"target": "MUTATION_RATE", "crossover": "One Point"}, fields)
    assert changes == [
        {"field": "target", "raw": "MUTATION_RATE", "status": "normalised",
         "note": "'MUTATION_RATE' read as 'mutation-rate'", "previous": "sigma", "value": "mutation-rate"},
        {"field": "crossover", "raw": "One Point", "status": "normalised",
         "note": "'One Point' read as 'one_point'", "previous": "blend", "value": "one_point"},
    ]
    assert state == {"target": "mutation-rate", "crossover": "one_point"}
    exact = apply_fields(state, {"crossover": "blend"}, fields[1:])
    assert exact == [{"field": "crossover", "raw": "blend", "status": "applied", "previous": "one_point",
                      "value": "blend"}]


def test_enum_mappings_accept_a_name_or_a_value_and_set_the_value() -> None:
    levels = field("rate", enum={"low": 0.01, "high": 0.2})
    state = {"rate": 0.05}
    assert apply_fields(state, {"rate": "HIGH"}, (levels,)) == [
        {"field": "rate", "raw": "HIGH", "status": "normalised", "note": "'HIGH' read as 0.2",
         "previous": 0.05, "value": 0.2}]
    assert apply_fields(state, {"rate": 0.01}, (levels,)) == [
        {"field": "rate", "raw": 0.01, "status": "applied", "previous": 0.2, "value": 0.01}]
    assert apply_fields(state, {"rate": "medium"}, (levels,)) == [
        {"field": "rate", "raw": "medium", "status": "rejected", "note": "'medium' is not one of: low, high"}]
    assert apply_fields(state, {"rate": "zigzag"}, (field("rate", enum=("a", "b")),)) == [
        {"field": "rate", "raw": "zigzag", "status": "rejected", "note": "'zigzag' is not one of: a, b"}]
    assert state == {"rate": 0.01}


def test_absent_advice_leaves_the_state_alone() -> None:
    state = {"rate": 0.1, "sigma": 1.0}
    changes = apply_fields(state, {"rate": None}, (field("rate", minimum=0, maximum=1), field("sigma")))
    assert changes == [
        {"field": "rate", "raw": None, "status": "absent", "note": "the advice has no rate"},
        {"field": "sigma", "raw": None, "status": "absent", "note": "the advice has no sigma"},
    ]
    assert state == {"rate": 0.1, "sigma": 1.0}


def test_dotted_paths_in_the_advice_and_the_state() -> None:
    state = {"ga": {"mutation": {"rate": 0.1}}, "other": 1}
    changes = apply_fields(state, {"advice": {"mutation_rate": "0.3"}},
                           (field("ga.mutation.rate", "advice.mutation_rate", maximum=0.5),))
    assert changes == [{"field": "ga.mutation.rate", "raw": "0.3", "status": "normalised",
                        "note": "'0.3' read as a number", "previous": 0.1, "value": 0.3}]
    assert state == {"ga": {"mutation": {"rate": 0.3}}, "other": 1}


def test_an_object_state_is_set_by_attribute() -> None:
    state = SimpleNamespace(rate=0.1, crossover="blend", inner=SimpleNamespace(sigma=1.0))
    changes = apply_fields(state, {"rate": 0.7, "crossover": "blend", "sigma": 0.5},
                           (field("rate", maximum=0.5), field("crossover"), field("inner.sigma", "sigma")))
    assert [(c["field"], c["status"]) for c in changes] == [
        ("rate", "clamped"), ("crossover", "unchanged"), ("inner.sigma", "applied")]
    assert (state.rate, state.crossover, state.inner.sigma) == (0.5, "blend", 0.5)


def test_equal_values_are_unchanged_and_types_are_kept() -> None:
    state = {"rate": 0.2, "size": 10, "name": "blend", "elitism": True}
    changes = apply_fields(state, {"rate": 0.2, "size": 10.0, "name": 3, "elitism": "yes"},
                           tuple(field(k) for k in state))
    assert changes == [
        {"field": "rate", "raw": 0.2, "status": "unchanged", "previous": 0.2, "value": 0.2},
        {"field": "size", "raw": 10.0, "status": "unchanged", "previous": 10, "value": 10},
        {"field": "name", "raw": 3, "status": "rejected", "note": "3 is not a str"},
        {"field": "elitism", "raw": "yes", "status": "rejected", "note": "'yes' is not true/false"},
    ]
    assert state == {"rate": 0.2, "size": 10, "name": "blend", "elitism": True}


# ---------------------------------------------------------------- what the terminal shows


def analysis(**fields: Any) -> dict[str, Any]:
    return {"checkpoint": 0, "mode": "blocking", "applied_at": None, "steps": {}, "advice": None,
            "changes": [], "seconds": 1.25, "error": None, **fields}


def test_analysis_lines() -> None:
    state = {"rate": 0.05, "crossover": "blend"}
    fields = (field("rate", maximum=0.5), field("crossover", enum=("blend", "uniform")))
    applied = analysis(asked_at=5, applied_at=5, status="applied",
                       steps={"advise": {"status": "completed",
                                         "answered_by": {"target": "coach", "link": 0}}},
                       changes=apply_fields(state, {"rate": 0.9, "crossover": "blend"}, fields))
    assert analysis_line("evolve", applied) == (
        "  evolve@5: applied at 5 (answered by coach): rate 0.05 -> 0.5 "
        "(0.9 is above max 0.5: clamped) [1.2s]")
    nothing = analysis(asked_at=6, applied_at=6, status="applied",
                       changes=apply_fields(state, {"rate": 0.5}, fields))
    assert analysis_line("evolve", nothing) == "  evolve@6: applied at 6: no change [1.2s]"
    rejected = analysis(asked_at=10, status="rejected",
                        changes=apply_fields(state, {"crossover": "zigzag"}, fields[1:]))
    assert analysis_line("evolve", rejected) == (
        "  evolve@10: rejected: crossover rejected ('zigzag' is not one of: blend, uniform) [1.2s]")
    failed = analysis(asked_at=15, status="failed", error="advise: the model did not answer", seconds=None,
                      steps={"advise": {"status": "failed", "message": "the model did not answer"}})
    assert analysis_line("evolve", failed) == "  evolve@15: failed: advise: the model did not answer [0.0s]"
    by_function = analysis(asked_at=20, applied_at=21, status="applied", changes=[{"function": "evo:fix"}],
                           mode="background")
    assert analysis_line("evolve", by_function) == "  evolve@20: applied at 21: by evo:fix [1.2s]"


def test_the_plan_shows_the_body_the_stop_conditions_and_each_checkpoint(tmp_path: Path) -> None:
    spec = load(tmp_path, """\
        params: {n: 40}
        steps:
          - id: evolve
            loop:
              generations: ${{ params.n }}
              init: {function: evo:init, args: {seed: 3}}
              body: evo:generation
              until: loop.stats.best < 0.01
              max_seconds: 2h
              checkpoints:
                - every: 5
                  steps:
                    - id: fresh
                      python: {function: evo:f}
                    - id: advise
                      python: {function: evo:f}
                  apply: {rate: {min: 0, max: 1}, crossover: {enum: [a, b]}}
                - at: [3, 7]
                  mode: background
                  history: 2
                  steps: [{id: note, python: {function: evo:f}}]
                  apply: evo:f
    """)
    lines = plan(spec).splitlines()
    start = lines.index("  1. evolve [loop]")
    assert lines[start + 1:] == [
        "     retries 0, timeout 120s, step cache on",
        "     body evo:generation, init evo:init; stops after 40 generations, "
        "or until loop.stats.best < 0.01, or at most 2h",
        "     checkpoint every 5 (first at 5), blocking, history 5: fresh [python] -> advise [python]; "
        "sets rate, crossover",
        "     checkpoint at 3, 7, background, history 2: note [python]; evo:f",
    ]
    assert lines[0].startswith("t: 1 steps (")


def test_until_and_when_check_loop_fields_params_and_the_loop_itself(tmp_path: Path) -> None:
    assert problems(tmp_path, """\
        steps:
          - id: evolve
            loop:
              generations: 3
              init: evo:init
              body: evo:generation
              max_seconds: soon
              until: loop.nope > 3 or params.zz > 3 or steps.evolve.output.generations > 3
              checkpoints:
                - every: 2
                  steps:
                    - id: ask
                      when: loop.stat.best > 1
                      python: {function: "evo:f", args: {x: "${{ steps.evolve.output }}"}}
        """) == [
        "s.yaml:9:20: steps[0].loop.max_seconds: invalid value 'soon' "
        "(Seconds as a number, or a string such as 500ms, 30s, 5m, 1h, 1d; at most 30d: no wait needs "
        "longer, and a longer one overflows the clock retries are scheduled on.)",
        "s.yaml:10:14: steps[0].loop.until: 'loop.nope': a loop reference is loop.FIELD "
        "(expected one of: asked_at, generation, generations, history, previous, state, stats)",
        "s.yaml:10:31: steps[0].loop.until: unknown parameter 'zz' (declare it under params)",
        "s.yaml:10:48: steps[0].loop.until: step 'evolve' refers to its own output",
        "s.yaml:15:21: steps[0].loop.checkpoints[0].steps[0].when: 'loop.stat.best': a loop reference is "
        "loop.FIELD (did you mean 'stats'?)",
        "s.yaml:16:53: steps[0].loop.checkpoints[0].steps[0].python.args.x: unknown step 'evolve' "
        "(a checkpoint sees its loop as loop.state, loop.stats, loop.history and loop.generation)",
    ]


def test_a_target_whose_parent_is_missing_is_rejected_not_a_crash() -> None:
    state = {"rate": 1.0}
    changes = apply_fields(state, {"rate": 0.2}, (ApplyField("ga.rate", "rate"),))
    assert changes == [{"field": "ga.rate", "raw": 0.2, "status": "rejected", "note": "the state has no ga"}]
    assert state == {"rate": 1.0}


def test_rounding_an_integer_field_keeps_it_within_its_bounds_and_floats_stay_floats() -> None:
    state = {"size": 1, "rate": 1.0}
    changes = apply_fields(state, {"size": 10, "rate": 1},
                           (ApplyField("size", "size", maximum=2.7), ApplyField("rate", "rate")))
    assert [(c["status"], c["value"]) for c in changes] == [("clamped", 2), ("unchanged", 1.0)]
    assert type(state["rate"]) is float and state["size"] == 2
