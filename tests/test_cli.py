"""The `lmflow` command: exit codes and messages, pinned."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, lmflow_in_process


def cli(*args: str) -> tuple[int, str, str]:
    out = lmflow_in_process(*args)
    return out.exit_code, out.stdout, out.stderr


def test_validate_ok() -> None:
    code, out, err = cli("validate", str(ROOT / "examples/quickstart.yaml"),
                         str(ROOT / "specs/extract-ticket.yaml"))
    assert (code, out, err) == (0, "ok: 2 specs valid\n", "")


def test_validate_reports_all_files_and_exits_2(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("version: 1\nname: a\nsteps:\n  - id: x\n    python: {function: m:f, arg: 1}\n")
    b = tmp_path / "b.yaml"
    b.write_text("version: 1\nname: [b\n")
    code, out, err = cli("validate", str(a), str(b), str(tmp_path / "missing.yaml"))
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"{a}:5:24: steps[0].python.function: module 'm' not found (put it next to the spec or install it)",
        f"{a}:5:29: steps[0].python.arg: unknown key 'arg' (did you mean 'args'?)",
        f"{b}:3:1: <document>: YAML syntax error: while parsing a flow sequence did not find "
        "expected ',' or ']' (fix the YAML syntax)",
        f"{tmp_path / 'missing.yaml'}: <document>: file not found (check the path)",
        "4 problems found",
    ]
    assert "Traceback" not in err


def test_bad_param_syntax() -> None:
    code, _, err = cli("plan", str(ROOT / "examples/quickstart.yaml"), "-p", "topic")
    assert code == 2
    assert err.splitlines()[0] == "command line: -p topic: expected name=value (e.g. -p generations=10)"


def test_plan_shows_order_dependencies_and_policies() -> None:
    code, out, _ = cli("plan", str(ROOT / "examples/quickstart.yaml"), "-p", "topic=sea")
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == "params: topic='sea'"
    assert "  3. stats [python] helpers:text_stats after fact, classify" in lines
    assert "     retries 1, timeout 60s, step cache on" in lines


def test_schema_is_valid_json_schema_and_matches_the_shipped_copy() -> None:
    from jsonschema import Draft202012Validator

    code, out, _ = cli("schema")
    assert code == 0
    schema = json.loads(out)
    Draft202012Validator.check_schema(schema)
    assert set(schema["$defs"]["step"]["properties"]) >= {"prompt", "python", "id", "retries"}
    shipped = json.loads((ROOT / "schema/lmflow-spec-v1.json").read_text())
    assert schema == shipped, "run `lmflow schema > schema/lmflow-spec-v1.json`"


def test_unknown_command_is_a_usage_error() -> None:
    code, _, err = cli("frobnicate")
    assert code == 2
    assert "No such command 'frobnicate'" in err


def test_testing_serve_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "ts.yaml"
    config.write_text("models:\n  - key: my-model\n")
    code, _, err = cli("testing", "serve", "--config", str(config))
    assert code == 2
    assert err.splitlines()[0] == (
        f"{config}:2:10: models[0].key: 'my-model' is not a bundled model (add file: one of "
        "smollm2-135m-instruct, gemma-3-270m, or path: model.gguf)")
    config.write_text("models:\n  - key: smollm2-135m-instruct\n    chat_template: no-such.jinja\n")
    code, _, err = cli("testing", "serve", "--config", str(config))
    assert code == 2
    assert err.splitlines()[0] == (
        f"{config}:3:20: models[0].chat_template: {tmp_path / 'no-such.jinja'} is not a file (give a Jinja "
        "template file, or one of chatml-tools)")
