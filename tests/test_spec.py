"""Spec loading and validation: every problem at once, with file:line:col, path and hint."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lmflow import SpecError, load_spec
from lmflow.spec.loader import parse_yaml

GOOD = """\
version: 1
name: demo
params: {topic: moon, n: 3}
models:
  smol: {key: smollm2-135m-instruct}
steps:
  - id: ask
    prompt:
      model: smol
      user: Tell me about ${{ params.topic }}
  - id: judge
    prompt:
      model: smol
      user: "Judge: ${{ steps.ask.output }}"
      response_schema:
        type: object
        properties: {score: {type: integer}, reason: {type: string}}
        required: [score]
  - id: count
    python:
      function: helpers:count
      args: {score: "${{ steps.judge.output.score }}", n: "${{ params.n }}"}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    (tmp_path / "helpers.py").write_text("def count(score, n):\n    return score * n\n")
    return path


def problems(tmp_path: Path, text: str, **params: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path, params)
    return [p.render().replace(str(tmp_path) + "/", "") for p in info.value.problems]


def test_valid_spec_loads_in_dependency_order(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert [s.id for s in spec.steps] == ["ask", "judge", "count"]
    assert spec.step("count").depends_on == ("judge",)
    assert spec.params == {"topic": "moon", "n": 3}
    assert spec.servers["default"].backend == "local"


def test_params_override_is_typed_by_default(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD), {"n": "7", "topic": "007"})
    assert spec.params == {"topic": "007", "n": 7}


def test_bad_param_overrides_are_reported(tmp_path: Path) -> None:
    assert problems(tmp_path, GOOD, n="many", topik="x") == [
        "command line: -p n: expected integer, got string 'many'",
        "command line: -p topik: unknown parameter 'topik' (did you mean 'topic'?)",
    ]


def test_a_param_value_nested_too_deep_is_refused_not_a_traceback(tmp_path: Path) -> None:
    spec = """\
        version: 1
        name: deep
        params: {x: {type: object, default: {}}}
        steps:
          - id: s
            python: {function: "helpers:count", args: {score: 1, n: 2}}
        """
    deep = '{"a": ' * 500 + "1" + "}" * 500
    assert problems(tmp_path, spec, x=deep) == [
        "command line: -p x: cannot parse '" + deep[:60] + "...': the document is nested more than "
        "64 levels deep (flatten the document)"]
    from lmflow.spec.params import ParamDecl, coerce_param  # a deployment's value comes typed

    value: object = 1
    for _ in range(500):
        value = {"a": value}
    with pytest.raises(ValueError, match="nested more than 64 levels deep"):
        coerce_param("x", value, ParamDecl("object", {}, declared=True))


def test_yaml_syntax_error_has_position(tmp_path: Path) -> None:
    found = problems(tmp_path, "version: 1\nname: x\nsteps:\n  - id: a\n   prompt: [\n")
    assert len(found) == 1
    assert found[0].startswith("spec.yaml:5:")
    assert "YAML syntax error" in found[0]


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    found = problems(tmp_path, "version: 1\nname: x\nname: y\nsteps: []\n")
    assert found == [
        "spec.yaml:3:1: name: duplicate key 'name' (YAML keeps only the last one; "
        "remove or rename the other)"
    ]


BAD = """\
version: 2
name: demo
modles: {}
models:
  smol: {key: smollm2-135m-instruct, context_length: big}
defaults: {retries: -1, timeout: soon}
steps:
  - id: ask
    prompt:
      model: smoll
      usr: hi
      temperature: 9
  - id: ask
    promt: {}
  - id: both
    prompt: {model: smol, user: x}
    python: {function: helpers:count}
  - id: 3bad
    python: {function: "not a function"}
  - id: refs
    prompt:
      model: smol
      user: "${{ params.nope }} ${{ steps.ghost.output }} ${{ steps.refs.output }} ${{ foo.bar }}"
"""


def test_all_problems_reported_at_once_with_positions_and_hints(tmp_path: Path) -> None:
    assert problems(tmp_path, BAD) == [
        "spec.yaml:1:10: version: unsupported spec version 2 (this lmflow reads version: 1)",
        "spec.yaml:3:1: modles: unknown key 'modles' (did you mean 'models'?)",
        "spec.yaml:5:54: models.smol.context_length: invalid value 'big' (Tokens, or 'probed' / "
        "'probed - 10%': the working maximum measured by `lmflow probe` or a probe_context step "
        "(refused when the probe found none), or \"probed: loadable\" / \"probed: loadable - 10%\" "
        "(quoted in YAML): the loadable maximum it measured.)",
        "spec.yaml:6:21: defaults.retries: -1 is less than the minimum of 0",
        "spec.yaml:6:34: defaults.timeout: invalid value 'soon' (Seconds as a number, or a "
        "string such as 500ms, 30s, 5m, 1h, 1d; at most 30d: no wait needs longer, and a longer one "
        "overflows the clock retries are scheduled on.)",
        "spec.yaml:10:7: steps[0].prompt: a prompt needs a user message "
        "(add user: ... or messages: [...])",
        "spec.yaml:10:14: steps[0].prompt.model: unknown model 'smoll' (did you mean 'smol'?)",
        "spec.yaml:11:7: steps[0].prompt.usr: unknown key 'usr' (did you mean 'user'?)",
        "spec.yaml:12:20: steps[0].prompt.temperature: 9 is greater than the maximum of 2",
        "spec.yaml:13:9: steps[1].id: duplicate step id 'ask', first given at steps[0] (line 8) "
        "(step ids must be unique: rename one)",
        "spec.yaml:14:5: steps[1].promt: unknown key 'promt' (did you mean 'prompt'?; "
        "step kinds: ensure_server, load_model, loop, probe_context, prompt, python, reload_model, "
        "unload_model)",
        "spec.yaml:17:5: steps[2].python: a step has one kind, found prompt, python "
        "(split it into several steps)",
        "spec.yaml:18:9: steps[3].id: '3bad' does not match ^[A-Za-z_][A-Za-z0-9_-]*$ "
        "(names use letters, digits, '_' and '-' and start with a letter)",
        "spec.yaml:19:24: steps[3].python.function: 'not a function' does not match "
        "^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$ "
        "(module:function; the spec's folder is importable.)",
        "spec.yaml:23:13: steps[4].prompt.user: step 'refs' refers to its own output",
        "spec.yaml:23:13: steps[4].prompt.user: unknown parameter 'nope' "
        "(declare it under params)",
        "spec.yaml:23:13: steps[4].prompt.user: unknown reference 'foo.bar': "
        "a reference starts with 'params.', 'steps.', in a step with foreach 'item' or 'index', "
            "in a loop's checkpoint and until 'loop.'",
        "spec.yaml:23:13: steps[4].prompt.user: unknown step 'ghost' "
        "(expected one of: 3bad, ask, both)",
    ]


def test_cycle_is_reported_with_its_path(tmp_path: Path) -> None:
    text = GOOD.replace("user: Tell me about ${{ params.topic }}",
                        "user: Tell me about ${{ steps.count.output }}")
    assert problems(tmp_path, text) == [
        "spec.yaml:7:9: steps[0].id: dependency cycle: ask -> count -> judge -> ask "
        "(each step uses the output of the next one: break the cycle)"
    ]


def test_reference_to_a_field_missing_from_the_response_schema(tmp_path: Path) -> None:
    text = GOOD.replace("steps.judge.output.score", "steps.judge.output.scor")
    assert problems(tmp_path, text) == [
        "spec.yaml:22:21: steps[2].python.args.score: steps.judge.output.scor: output has no "
        "field 'scor' in its response_schema (did you mean 'score'?)"
    ]


def test_fields_of_a_plain_text_output_are_an_error(tmp_path: Path) -> None:
    text = GOOD.replace("Judge: ${{ steps.ask.output }}", "Judge: ${{ steps.ask.output.text }}")
    assert problems(tmp_path, text) == [
        "spec.yaml:14:13: steps[1].prompt.user: steps.ask.output.text: output is string, "
        "it has no field 'text'"
    ]


def test_files_referenced_by_a_step_must_exist(tmp_path: Path) -> None:
    text = GOOD.replace("user: Tell me about ${{ params.topic }}",
                        "user: {file: prompts/ask.md}\n      images: [cat.png]")
    assert problems(tmp_path, text) == [
        "spec.yaml:10:20: steps[0].prompt.user.file: file not found: prompts/ask.md "
        "(paths are relative to the spec's folder)",
        "spec.yaml:11:16: steps[0].prompt.images[0]: image not found: cat.png "
        "(paths are relative to the spec's folder)",
    ]


def test_templates_inside_prompt_files_are_checked(tmp_path: Path) -> None:
    (tmp_path / "ask.md").write_text("About ${{ params.topicc }}\n")
    text = GOOD.replace("user: Tell me about ${{ params.topic }}", "user: {file: ask.md}")
    assert problems(tmp_path, text) == [
        "spec.yaml:10:13: steps[0].prompt.user: unknown parameter 'topicc' "
        "(did you mean 'topic'?)"
    ]


def test_response_schema_file_must_be_a_json_schema(tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text(json.dumps({"type": "objekt"}))
    text = GOOD.replace("response_schema:\n", "response_schema: schema.json\n      x_:\n")
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith("        ") or "args" in line) + "\n"
    text = text.replace("      x_:\n", "")
    found = problems(tmp_path, text)
    assert any("steps[1].prompt.response_schema: not a valid JSON Schema at type" in f
               for f in found), found


def test_local_model_must_be_bundled_or_a_path(tmp_path: Path) -> None:
    text = GOOD.replace("smol: {key: smollm2-135m-instruct}", "smol: {key: llama-70b}")
    assert problems(tmp_path, text) == [
        "spec.yaml:5:15: models.smol.key: 'llama-70b' is not a bundled model (bundled: "
        "smollm2-135m-instruct, gemma-3-270m; or give path: /path/to/model.gguf)"
    ]


def test_openai_server_needs_a_url(tmp_path: Path) -> None:
    text = GOOD.replace("models:", "server: {backend: openai}\nmodels:")
    assert problems(tmp_path, text) == [
        "spec.yaml:4:9: server: an openai server needs a url (e.g. url: http://127.0.0.1:8080)"
    ]


def test_positions_of_keys_and_values() -> None:
    doc = parse_yaml("a:\n  b: [1, {c: 2}]\n", "x.yaml")
    assert doc.position(("a", "b", 1, "c")) == (2, 14)
    assert doc.position(("a", "b"), key=True) == (2, 3)
    assert doc.position(("a", "missing")) == (2, 3)


def test_not_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- 1\n- 2\n") == [
        "spec.yaml:1:1: <document>: a spec is a mapping with version, name and steps "
        "(see examples/quickstart.yaml)"
    ]


@pytest.mark.parametrize("folder", ["examples", "specs"])
def test_every_shipped_spec_is_valid(folder: str) -> None:
    from lmflow import validate_files

    paths = sorted((Path(__file__).parent.parent / folder).glob("*.yaml"))
    assert paths, f"no specs in {folder}/"
    assert validate_files(paths) == []


def test_fallback_chains_guard_and_cache_are_checked(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        version: 1
        name: chains
        models:
          big: {key: smollm2-135m-instruct, fallback: [smal, {python: "nowhere:f"}, big, {value: 1, x: 2}]}
          small: {key: smollm2-135m-instruct}
        guard: {min_free_memory: lots, action: panic}
        response_cache: {size_limit: 10XB}
        steps:
          - id: ask
            prompt: {model: big, user: hi, fallback: [huge], response_cache: {key: "gone:k"}}
        """)
    assert found == [
        "spec.yaml:4:48: models.big.fallback[0]: unknown model 'smal' (did you mean 'small'?)",
        "spec.yaml:4:54: models.big.fallback[1]: module 'nowhere' not found (put it next to the spec or "
        "install it)",
        "spec.yaml:4:77: models.big.fallback[2]: model 'big' cannot be its own fallback",
        "spec.yaml:4:82: models.big.fallback[3]: invalid value {'value': 1, 'x': 2} (A model alias, "
        "{python: module:function} or {value: ...}.)",
        "spec.yaml:6:26: guard.min_free_memory: invalid value 'lots' (Bytes as a number, or a string such "
        "as 500MB, 2GB, 1GiB.)",
        "spec.yaml:6:40: guard.action: 'panic' is not one of: fallback, wait, fail",
        "spec.yaml:7:30: response_cache.size_limit: invalid value '10XB' (Bytes as a number, or a string "
        "such as 500MB, 2GB, 1GiB.)",
        "spec.yaml:10:47: steps[0].prompt.fallback[0]: unknown model 'huge' (expected one of: big, small)",
        "spec.yaml:10:76: steps[0].prompt.response_cache.key: module 'gone' not found (put it next to the "
        "spec or install it)",
    ]


def test_a_valid_chain_and_its_settings_load(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, """\
        version: 1
        name: chains
        models:
          big: {key: smollm2-135m-instruct, fallback: [small, {python: "helpers:count"}, {value: {a: 1}}]}
          small: {key: smollm2-135m-instruct}
        breaker: {failures: 5, cooldown: 2m}
        guard: {min_free_memory: 2GiB, min_cpu_idle: 15%, action: wait, wait: 10s}
        response_cache: {ttl: 1d, size_limit: 500MB}
        defaults: {timeout: 30s, timeout_growth: 1.5, retries: 2}
        steps:
          - id: ask
            prompt: {model: big, user: hi}
        """))
    assert [(link.kind, link.target) for link in spec.models["big"].fallback] == [
        ("model", "small"), ("python", "helpers:count"), ("value", {"a": 1})]
    assert (spec.breaker.failures, spec.breaker.cooldown) == (5, 120.0)
    assert (spec.guard.min_free_memory, spec.guard.min_cpu_idle, spec.guard.action, spec.guard.wait) == (
        2 * 2**30, 0.15, "wait", 10.0)
    assert (spec.response_cache.ttl, spec.response_cache.size_limit) == (86400.0, 500_000_000)
    assert [spec.step("ask").policy.attempt_timeout(n) for n in (1, 2, 3)] == [30.0, 45.0, 67.5]


def test_no_import_checks_the_specs_modules_without_running_them(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lmflow.cli import cli

    (tmp_path / "loud.py").write_text("open(__file__ + '.ran', 'w').close()\n\n\ndef works(x):\n"
                                      "    return x\n")
    spec = tmp_path / "loud.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: loud
        steps:
          - id: a
            python: {function: "loud:works", args: {x: 1}}
          - id: b
            python: {function: "loud:wroks", args: {x: 1}}
          - id: c
            python: {function: "json:dumps", args: {obj: 1}}
          - id: d
            python: {function: "nowhere:f"}
        """))
    runner = CliRunner()
    for command in (["validate", "--no-import", str(spec)], ["plan", "--no-import", str(spec)]):
        out = runner.invoke(cli, command)
        assert isinstance(out.exception, SpecError), out.output
        assert not (tmp_path / "loud.py.ran").exists(), command  # nothing of the spec's ran
        problems = [p.render() for p in out.exception.problems]
        assert [p.split(": ", 2)[1:] for p in problems] == [
            ["steps[1].python.function", f"module 'loud' ({tmp_path / 'loud.py'}) has no function 'wroks' "
             "(did you mean 'works'?)"],
            ["steps[3].python.function",
             "module 'nowhere' not found (put it next to the spec or install it)"]]
    out = runner.invoke(cli, ["validate", str(spec)])  # as a run does: the module is imported
    assert isinstance(out.exception, SpecError) and (tmp_path / "loud.py.ran").exists()
