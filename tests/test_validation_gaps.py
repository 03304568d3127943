"""What validation used to let through to the run: function references that do not load, unbounded
max_tokens and durations, a duplicate step id reported as a self-reference, and a flow that dies
outside any step."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import lmflow_cmd

import lmflow
from lmflow import load_spec, validate_files
from lmflow.cli import main

HELPERS = """\
LIMIT = 3


def text_stats(text):
    return {"words": len(text.split())}


def request_key(request):
    return "k"


def init(**kw):
    return {"rate": 0.1}


def generation(state, g):
    return {"best": 1.0 / g}
"""


def write(folder: Path, body: str, helpers: str = HELPERS, name: str = "s.yaml") -> Path:
    """A spec whose body starts at line 3 (after version and name), with helpers.py next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "helpers.py").write_text(helpers)
    path = folder / name
    path.write_text("version: 1\nname: t\n" + textwrap.dedent(body))
    return path


def problems(path: Path) -> list[str]:
    return [p.render().removeprefix(f"{path}:").replace(str(path.parent), "DIR")
            for p in validate_files([path])]


@pytest.fixture(autouse=True)
def forget_helpers() -> Iterator[None]:
    """These tests' modules are named like the user's (`helpers`): none may leak into the next test."""
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("helpers", "broken", "needs_dep", "pkg")]:
        del sys.modules[name]


# ---------------------------------------------------------------- function references


def test_a_typo_in_a_function_is_found_by_validate_with_the_nearest_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, """\
        steps:
          - id: stats
            python: {function: "helpers:text_stat", args: {text: hi}}
          - id: limit
            python: {function: "helpers:LIMIT"}
          - id: other
            python: {function: "helper:text_stats"}
    """)
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(spec)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{spec}:5:24: steps[0].python.function: module 'helpers' has no function 'text_stat' "
        "(did you mean 'text_stats'?)",
        f"{spec}:7:24: steps[1].python.function: 'LIMIT' in module 'helpers' is not a function: it is of "
        "type int (name a function (def) or another callable)",
        f"{spec}:9:24: steps[2].python.function: module 'helper' not found (did you mean 'helpers'?)",
        "3 problems found",
    ]


def test_every_function_reference_is_loaded_the_same_way(tmp_path: Path) -> None:
    spec = write(tmp_path, """\
        models:
          smol: {key: smollm2-135m-instruct, fallback: [{python: "helpers:answr"}]}
        steps:
          - id: ask
            prompt:
              model: smol
              user: hi
              fallback: [{python: "helpers:nope"}]
              response_cache: {key: "helpers:request_kee"}
          - id: evolve
            loop:
              generations: 3
              init: {function: "helpers:int", args: {}}
              body: "helpers:generatio"
              checkpoints:
                - every: 1
                  steps: [{id: advise, python: {function: "helpers:text_stats", args: {text: x}}}]
                  apply: "helpers:aply"
    """)
    assert problems(spec) == [
        "4:49: models.smol.fallback[0]: module 'helpers' has no function 'answr' (expected one of: "
        "generation, init, request_key, text_stats)",
        "10:18: steps[0].prompt.fallback[0]: module 'helpers' has no function 'nope' (expected one of: "
        "generation, init, request_key, text_stats)",
        "11:29: steps[0].prompt.response_cache.key: module 'helpers' has no function 'request_kee' "
        "(did you mean 'request_key'?)",
        "15:24: steps[1].loop.init.function: module 'helpers' has no function 'int' "
        "(did you mean 'init'?)",
        "16:13: steps[1].loop.body: module 'helpers' has no function 'generatio' "
        "(did you mean 'generation'?)",
        "20:18: steps[1].loop.checkpoints[0].apply: module 'helpers' has no function 'aply' "
        "(expected one of: generation, init, request_key, text_stats)",
    ]


def test_a_module_that_fails_to_import_says_why_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import os\n\nraise ValueError('no config for ' + 'prod')\n")
    (tmp_path / "needs_dep.py").write_text("import lmflow_no_such_dependency\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub.py").write_text("def run():\n    return 1\n")
    spec = write(tmp_path, """\
        steps:
          - {id: a, python: {function: "broken:f"}}
          - {id: b, python: {function: "needs_dep:f"}}
          - {id: c, python: {function: "pkg.sub:runn"}}
          - {id: d, python: {function: "pkg.other:run"}}
          - {id: e, python: {function: "pkg.sub:run"}}
    """)
    assert problems(spec) == [
        "4:32: steps[0].python.function: importing broken raised ValueError: no config for prod at "
        "DIR/broken.py:3 (validation imports the module and calls nothing: fix what its top level runs)",
        "5:32: steps[1].python.function: importing needs_dep raised ModuleNotFoundError: No module named "
        "'lmflow_no_such_dependency' (install 'lmflow_no_such_dependency' where lmflow runs)",
        "6:32: steps[2].python.function: module 'pkg.sub' has no function 'runn' (did you mean 'run'?)",
        "7:32: steps[3].python.function: module 'pkg.other' not found (put it next to the spec or "
        "install it)",
    ]


def test_a_module_named_like_the_standard_library_is_caught_before_the_run(tmp_path: Path) -> None:
    import json

    (tmp_path / "json.py").write_text("def parse(text):\n    return text\n")
    spec = write(tmp_path, """\
        steps: [{id: a, python: {function: "json:parse"}}]
    """)
    assert problems(spec) == [
        f"3:36: steps[0].python.function: module 'json' resolved to {json.__file__}, not to DIR/json.py: "
        "its name is taken (standard library or installed); rename it",
    ]


def test_validation_imports_but_never_calls_and_leaves_no_module_behind(tmp_path: Path) -> None:
    called = tmp_path / "called"
    imported = tmp_path / "imported"
    helpers = (f"from pathlib import Path\nPath({str(imported)!r}).touch()\n\n\n"
               f"def f(**kw):\n    Path({str(called)!r}).touch()\n")
    first = write(tmp_path / "a", """\
        steps: [{id: a, python: {function: "helpers:f"}}]
    """, helpers=helpers)
    # another spec in the same process, with a helpers.py of its own that has another function
    second = write(tmp_path / "b", """\
        steps: [{id: b, python: {function: "helpers:g"}}]
    """, helpers="def g(**kw):\n    return 'b'\n")
    path_before = list(sys.path)

    assert load_spec(first).steps[0].id == "a"
    assert imported.exists() and not called.exists()
    assert "helpers" not in sys.modules and sys.path == path_before
    assert load_spec(second).steps[0].id == "b"  # not the first folder's helpers, cached

    from lmflow.steps.python import call_function

    assert call_function("helpers:g", {}, second.parent) == "b"  # what a run then imports


# ---------------------------------------------------------------- bounds


def test_max_tokens_is_bounded_and_must_fit_the_declared_context(tmp_path: Path) -> None:
    spec = write(tmp_path, """\
        models:
          smol: {key: smollm2-135m-instruct, context_length: 2048}
          large: {key: smollm2-135m-instruct, context_length: 2048}
          probed: {key: smollm2-135m-instruct, context_length: probed}
          free: {key: smollm2-135m-instruct}
        steps:
          - id: typo
            prompt: {model: free, user: hi, max_tokens: 999999999999}
          - id: too_long
            prompt: {model: smol, user: hi, max_tokens: 4096}
          - id: fits
            prompt: {model: smol, user: hi, max_tokens: 2048}
          - id: unknown_size
            prompt: {model: probed, user: hi, max_tokens: 4096}
          - id: load
            load_model: {model: large, context_length: 8192}
          - id: loaded_larger
            prompt: {model: large, user: hi, max_tokens: 4096}
    """)
    assert problems(spec) == [
        "10:49: steps[0].prompt.max_tokens: 999999999999 is greater than the maximum of 1048576",
        "12:49: steps[1].prompt.max_tokens: max_tokens 4096 does not fit in model 'smol' (context_length "
        "2048) (the prompt and the answer share the context: lower max_tokens, or raise "
        "models.smol.context_length)",
    ]


def test_durations_are_bounded_to_30_days(tmp_path: Path) -> None:
    spec = write(tmp_path, """\
        defaults: {timeout: 999999d, retry_delay: 99999999999}
        response_cache: {ttl: 31d}
        models:
          smol: {key: smollm2-135m-instruct}
        steps:
          - id: a
            timeout: 30d
            cache: {ttl: 2592001}
            prompt: {model: smol, user: hi, response_cache: {ttl: 720h}}
          - id: b
            retry_delay: 43201m
            prompt: {model: smol, user: hi, response_cache: {ttl: 999d}}
          - id: evolve
            loop: {init: "helpers:init", body: "helpers:generation", max_seconds: "100000000 s"}
          - id: c
            timeout: soon
            python: {function: "helpers:text_stats", args: {text: x}}
    """)
    longer = ("is longer than 30d (30d is the longest wait lmflow accepts, as a longer one is most likely "
              "a typo")
    assert problems(spec) == [
        f"3:21: defaults.timeout: duration '999999d' {longer})",
        f"3:43: defaults.retry_delay: duration 99999999999 {longer})",
        f"4:23: response_cache.ttl: duration '31d' {longer}; a cache without ttl never expires)",
        f"10:18: steps[0].cache.ttl: duration 2592001 {longer}; a cache without ttl never expires)",
        f"13:18: steps[1].retry_delay: duration '43201m' {longer})",
        f"14:59: steps[1].prompt.response_cache.ttl: duration '999d' {longer}; a cache without ttl never "
        "expires)",
        f"16:75: steps[2].loop.max_seconds: duration '100000000 s' {longer})",
        "18:14: steps[3].timeout: invalid value 'soon' (Seconds as a number, or a string such as 500ms, "
        "30s, 5m, 1h, 1d; at most 30d: no wait needs longer, and a longer one overflows the clock retries "
        "are scheduled on.)",
    ]


# ---------------------------------------------------------------- step ids


def test_a_duplicate_step_id_is_reported_once_with_both_positions(tmp_path: Path) -> None:
    spec = write(tmp_path, """\
        steps:
          - id: fact
            python: {function: "helpers:text_stats", args: {text: hi}}
          - id: fact
            python: {function: "helpers:text_stats", args: {text: "${{ steps.fact.output.words }}"}}
          - id: next
            python: {function: "helpers:text_stats", args: {text: "${{ steps.fact.output.words }}"}}
    """)
    assert problems(spec) == [
        "6:9: steps[1].id: duplicate step id 'fact', first given at steps[0] (line 4) "
        "(step ids must be unique: rename one)",
    ]


# ---------------------------------------------------------------- the flow itself


@pytest.mark.slow
def test_a_flow_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    from lmflow.backends.local import free_port

    spec = write(tmp_path, """\
        steps:
          - id: a
            python: {function: "helpers:text_stats", args: {text: hi}}
          - id: b
            python: {function: "helpers:text_stats", args: {text: "${{ steps.a.output.words }}"}}
    """)
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    out = lmflow_cmd("run", str(spec), env={"PREFECT_API_URL": api}, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f"error: run failed: the flow stopped: RuntimeError: Failed to reach API at {api}/ "
        "(`lmflow run -v` shows Prefect's traceback)")
    assert "Traceback" not in out.stderr
    assert [line.split()[2] for line in out.stdout.splitlines()[2:4]] == ["skipped", "skipped"]
    assert "running" not in out.stdout and "pending" not in out.stdout


def test_steps_a_dead_flow_left_are_not_shown_as_running(tmp_path: Path) -> None:
    from lmflow.engine.records import RunRecorder
    from lmflow.prefect.flow import _flow_stopped
    from lmflow.render.report import footer, table

    spec = load_spec(write(tmp_path, """\
        steps:
          - {id: a, python: {function: "helpers:text_stats", args: {text: hi}}}
          - {id: b, python: {function: "helpers:text_stats", args: {text: hi}}}
          - {id: c, python: {function: "helpers:text_stats", args: {text: hi}}}
    """))
    recorder = RunRecorder(spec)
    recorder.update("a", status="completed", output={"words": 1})
    recorder.update("b", status="running")
    _flow_stopped(recorder, OverflowError("timestamp out of range for platform time_t"))
    recorder.save()
    result = recorder.result
    assert result.error == ("the flow stopped: OverflowError: timestamp out of range for platform time_t "
                            "(`lmflow run -v` shows Prefect's traceback)")
    assert [(s.status, s.reason) for s in result.steps] == [
        ("completed", None), ("interrupted", "the flow stopped while it ran"),
        ("skipped", "the flow stopped before it started")]
    assert "running" not in table(result) and "pending" not in footer(result)
    assert "3 steps: 1 completed, 1 interrupted, 1 skipped" in footer(result)


# ---------------------------------------------------------------- policy fields that use params


POLICY_FROM_PARAMS = """\
    params: {timeout: 120s, tries: 0, at_once: 2}
    defaults: {timeout: "${{ params.timeout }}", max_parallel: "${{ params.at_once }}"}
    steps:
      - id: count
        retries: "${{ params.tries }}"
        python: {function: "helpers:text_stats", args: {text: "a b"}}
    """


def test_policy_fields_that_use_params_take_this_run_s_values(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, POLICY_FROM_PARAMS)
    spec = load_spec(path, {"timeout": "2s", "tries": 3, "at_once": 6})
    policy = spec.step("count").policy
    assert (policy.timeout, policy.retries) == (2.0, 3)
    assert spec.defaults.timeout == 2.0 and spec.max_parallel == 6
    assert load_spec(path).step("count").policy.timeout == 120.0  # the param's default
    main(["plan", str(path), "-p", "timeout=2s", "-p", "tries=3"])
    assert "retries 3, timeout 2s" in capsys.readouterr().out


def test_a_policy_field_refers_to_params_only_and_gets_a_value_it_takes(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY_FROM_PARAMS.replace('retries: "${{ params.tries }}"',
                                                      'retries: "${{ steps.other.output }}"'))
    assert problems(path) == [
        "7:14: steps[0].retries: 'steps.other.output': retries is decided before any step runs, so it "
        "may refer to params only (e.g. retries: ${{ params.retries }})"]
    path = write(tmp_path, POLICY_FROM_PARAMS)
    with pytest.raises(lmflow.SpecError) as info:
        load_spec(path, {"timeout": "soon", "tries": -1})
    assert [p.render().removeprefix(f"{path}:") for p in info.value.problems] == [
        "4:21: defaults.timeout: timeout is 'soon' with this run's params: expected a duration such as 30s "
        "or 2m (fix the param's value (-p) or its default)",
        "7:14: steps[0].retries: retries is -1 with this run's params: expected a whole number (fix the "
        "param's value (-p) or its default)"]


BLOCKS_FROM_PARAMS = """\
    params: {free: 1GiB, idle: "20%", ttl: 1h, at_once: 3, fails: 2, size: 500MB}
    guard: {min_free_memory: "${{ params.free }}", min_cpu_idle: "${{ params.idle }}", action: fail}
    breaker: {failures: "${{ params.fails }}", cooldown: "${{ params.ttl }}"}
    response_cache: {ttl: "${{ params.ttl }}", size_limit: "${{ params.size }}"}
    steps:
      - id: each
        foreach: [1, 2]
        parallel: "${{ params.at_once }}"
        cache: {ttl: "${{ params.ttl }}"}
        python: {function: "helpers:text_stats", args: {text: "a b"}}
    """


def test_guard_breaker_caches_and_parallel_take_this_run_s_params(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, BLOCKS_FROM_PARAMS)
    spec = load_spec(path, {"free": "2GiB", "idle": "35%", "ttl": "2h", "at_once": 5, "fails": 7,
                            "size": "2GB"})
    assert (spec.guard.min_free_memory, spec.guard.min_cpu_idle) == (2 * 2**30, 0.35)
    assert (spec.breaker.failures, spec.breaker.cooldown) == (7, 7200.0)
    assert (spec.response_cache.ttl, spec.response_cache.size_limit) == (7200.0, 2 * 10**9)
    each = spec.step("each")
    assert (each.parallel, each.policy.cache_ttl) == (5, 7200.0)
    assert load_spec(path).guard.min_free_memory == 2**30  # the param's default
    main(["plan", str(path), "-p", "free=2GiB", "-p", "idle=35%", "-p", "at_once=5"])
    out = capsys.readouterr().out
    assert "guard: fail when free memory < 2 GiB or idle CPU < 35%" in out
    assert "response cache: ttl 1h, at most 500 MB" in out and "2 at once" not in out and "5 at once" in out
    with pytest.raises(lmflow.SpecError) as info:
        load_spec(path, {"free": "lots", "at_once": 0})
    assert [p.render().removeprefix(f"{path}:") for p in info.value.problems] == [
        "4:26: guard.min_free_memory: min_free_memory is 'lots' with this run's params: expected a size "
        "such as 500MB or 2GiB (fix the param's value (-p) or its default)",
        "10:15: steps[0].parallel: parallel is 0 with this run's params: expected a whole number >= 1 (fix "
        "the param's value (-p) or its default)"]


def test_a_field_read_as_written_refuses_a_reference(tmp_path: Path) -> None:
    path = write(tmp_path, BLOCKS_FROM_PARAMS.replace("action: fail", 'action: "${{ params.idle }}"')
                 .replace("        parallel:", "        grain: \"${{ params.at_once }}\"\n        parallel:"))
    hint = ("(write the value itself; params can set a step's policy, parallel and cache.ttl, defaults, "
            "breaker, guard, response_cache and server fields)")
    assert problems(path) == [
        f"4:92: guard.action: cannot use ${{{{ params.idle }}}}: this field is read as written, before any "
        f"step runs {hint}",
        f"10:12: steps[0].grain: cannot use ${{{{ params.at_once }}}}: this field is read as written, before "
        f"any step runs {hint}"]


def test_plan_shows_the_schedule_and_a_prompt_s_response_cache(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, """\
        schedule: {cron: "0 6 * * 1-5", timezone: Europe/Berlin}
        response_cache: {ttl: 1d}
        models: {smol: {key: smollm2-135m-instruct}}
        steps:
          - id: a
            prompt: {model: smol, user: hi, response_cache: {key: "helpers:text_stats", ttl: 2h}}
          - id: b
            prompt: {model: smol, user: hi, response_cache: false}
        """)
    main(["plan", str(path)])
    out = capsys.readouterr().out
    assert "schedule: cron '0 6 * * 1-5' (Europe/Berlin) (when served or deployed)" in out
    assert "response cache: ttl 1d, at most 1 GiB" in out
    assert ("     response cache: ttl 2h, key helpers:text_stats (answers shared by requests it maps to "
            "one key)") in out
    assert "     response cache off for this step" in out


def test_a_kind_s_option_written_beside_it_says_where_it_goes(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        models: {smol: {key: smollm2-135m-instruct}}
        steps:
          - id: a
            response_cache: {key: "helpers:text_stats"}
            prompt: {model: smol, user: hi}
        """)
    (problem,) = problems(path)
    assert problem.endswith("steps[0].response_cache: unknown key 'response_cache' ('response_cache' is an "
                            "option of prompt: put it under prompt:)")
