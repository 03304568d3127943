from __future__ import annotations

import ast
import re
import threading
from types import SimpleNamespace

import pytest

from lmflow.spec.expressions import ExpressionError, Reference, parse_expression

NAMES = {"params": {"n": 5, "name": " Ada ", "tags": ["red", "blue"], "empty": [], "zero": 0},
         "steps": {"ask": {"output": {"label": "yes", "score": 0.75, "items": [{"x": 1}, {"x": 2}]}},
                   "skipped": {"output": None}}}


def value(text: str, names: dict | None = None, roots: tuple[str, ...] = ("params", "steps")) -> object:
    return parse_expression(text, roots).evaluate(NAMES if names is None else names)


def refused(text: str, roots: tuple[str, ...] = ("params", "steps")) -> ExpressionError:
    with pytest.raises(ExpressionError) as info:
        parse_expression(text, roots)
    return info.value


@pytest.mark.parametrize(("text", "expected"), [
    ("params.n > 3", True), ("params.n >= 6", False), ("params.n == 5", True), ("params.n != 5", False),
    ("steps.ask.output.label == 'yes'", True), ('steps.ask.output.label == "no"', False),
    ("1 < params.n < 10", True), ("'1' == 1", False), ("params.n == 5.0", True),
])
def test_comparisons(text: str, expected: bool) -> None:
    assert value(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ("params.n > 3 and steps.ask.output.score > 0.5", True), ("params.n > 9 or params.zero", 0),
    ("not params.empty", True), ("params.n and params.name", " Ada "), ("true and not false", True),
    ("True and not None", True), ("'red' in params.tags", True), ("'green' not in params.tags", True),
    ("'sk' in 'ask'", True), ("'label' in steps.ask.output", True),
])
def test_and_or_not_in(text: str, expected: object) -> None:
    assert value(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("params.n + 1", 6), ("params.n - 7", -2), ("params.n * 2", 10), ("params.n / 2", 2.5),
    ("params.n // 2", 2), ("params.n % 3", 2), ("-params.n", -5), ("'a' + 'b'", "ab"),
    ("[1, 2] + [3]", [1, 2, 3]), ("(1, 2)", [1, 2]), ("'big' if params.n > 3 else 'small'", "big"),
])
def test_arithmetic_and_literals(text: str, expected: object) -> None:
    assert value(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("len(params.tags)", 2), ("len(steps.ask.output.label)", 3), ("lower('AbC')", "abc"),
    ("upper(steps.ask.output.label)", "YES"), ("strip(params.name)", "Ada"),
    ("startswith(strip(params.name), 'A')", True), ("endswith('report.csv', '.json')", False),
    ("contains(params.tags, 'blue')", True), ("contains('moonlight', 'light')", True),
    ("int('42') + 1", 43), ("float('0.5')", 0.5), ("str(params.n)", "5"), ("round(2.567, 1)", 2.6),
    ("abs(-3)", 3), ("min(params.n, 2)", 2), ("max([4, 9, 1])", 9), ("bool(params.empty)", False),
])
def test_functions(text: str, expected: object) -> None:
    assert value(text) == expected


@pytest.mark.parametrize("text", [
    "params.missing", "params.missing.deeper[0]", "params['missing']", "steps.skipped.output.label",
    "steps.ask.output.items[7]", "steps.ask.output.items[0].nope", "null.anything",
])
def test_missing_keys_and_lookups_on_null_are_null(text: str) -> None:
    expression = parse_expression(text)
    assert expression.evaluate(NAMES) is None
    assert expression.test(NAMES) is False


def test_lookups_by_key_and_index() -> None:
    assert value("steps['ask'].output.items[1]['x']") == 2
    assert value("steps.ask.output.items[-1].x") == 2
    assert value("steps.ask.output[params.key]", {**NAMES, "params": {"key": "label"}}) == "yes"


@pytest.mark.parametrize(("result", "expected"), [
    (None, False), (False, False), (0, False), (0.0, False), ("", False), ([], False), ({}, False),
    (True, True), (1, True), ("no", True), ([0], True), ({"a": None}, True),
])
def test_truthiness_is_github_like(result: object, expected: bool) -> None:
    assert parse_expression("params.v").test({"params": {"v": result}}) is expected


def test_references_with_paths_and_offsets() -> None:
    text = "steps.ask.output.label == 'yes' and params.n > len(steps['b'].output.items[0])"
    assert parse_expression(text).references == (
        Reference("steps", ("ask", "output", "label"), 0),
        Reference("params", ("n",), 36),
        Reference("steps", ("b", "output", "items", 0), 51),
    )


def test_references_inside_wrapping_point_into_the_original_text() -> None:
    text = "  ${{ params.n > 3 or\n  item.x }} "
    expression = parse_expression(text, ("params", "item"))
    assert expression.text == "params.n > 3 or\n  item.x"
    assert [(ref.root, ref.path, ref.offset) for ref in expression.references] == [
        ("params", ("n",), 6), ("item", ("x",), 24)]
    assert text[24:30] == "item.x"
    assert expression.evaluate({"params": {"n": 1}, "item": {"x": "y"}}) == "y"


def test_a_computed_key_ends_the_reference_path() -> None:
    refs = parse_expression("steps[params.id].output.label").references
    assert refs == (Reference("steps", (), 0), Reference("params", ("id",), 6))
    assert parse_expression("item").references == (Reference("item", (), 0),)


def test_non_ascii_text_keeps_character_offsets() -> None:
    text = "${{ 'héllo wörld' == params.é }}"
    assert parse_expression(text).references[0].offset == text.index("params")
    error = refused("'é' ** 2")
    assert error.offset == 4


@pytest.mark.parametrize(("text", "message", "offset"), [
    ("params.name.__class__", "names starting with '_' are not allowed", 12),
    ("__import__('os')", "unknown function '__import__'", 0),
    ("_secret", "names starting with '_' are not allowed", 0),
    ("params.name.lower()", r"method calls are not allowed \(write lower\(x\) instead of x.lower\(\)\)", 12),
    ("params.name.format(1)", "method calls are not allowed", 12),
    ("len(params.tags)(1)", "only these functions can be called", 0),
    ("lambda: 1", "not allowed in an expression: lambda", 0),
    ("[t for t in params.tags]", "not allowed in an expression: comprehensions", 0),
    ("params.n ** 2", "not allowed in an expression: '\\*\\*'", 9),
    ("params.n | 1", "not allowed in an expression: '|' \\(write or\\)", 9),
    ("~params.n", "not allowed in an expression: '~'", 0),
    ("params.n is None", "not allowed in an expression: 'is' \\(write ==\\)", 9),
    ("f'{params.n}'", "f-strings", 0),
    ("(x := 1)", "walrus", 1),
    ("{'a': 1}", "dict literals", 0),
    ("{1}", "set literals", 0),
    ("[*params.tags]", "'\\*' unpacking", 1),
    ("params.tags[0:1]", "slices", 12),
    ("params.tags[0, 1]", "one key at a time", 12),
    ("b'x'", "bytes literals", 0),
    ("parms.n", "unknown name 'parms': did you mean 'params'\\? \\(names here: params, steps\\)", 0),
    ("os.system('x')", "method calls are not allowed", 3),
    ("open('x')", "unknown function 'open' \\(functions: len, lower, upper", 0),
    ("len", "'len' is a function", 0),
    ("startswith('a')", "startswith\\(\\) takes 2 arguments, not 1", 0),
    ("round(1.5, ndigits=1)", "takes no keyword arguments", 19),
    ("-" * 120 + "1", "nests more than 100 levels", 100),
    ("params.n > ", "invalid expression: invalid syntax", 10),
    ("params.n > 1 && params.n < 9", "write and, or, not", 14),
    ("${{ params.n }} > 1", "one \\${{ }} or none", 0),
    ("", "empty expression", 0),
    ("${{   }}", "empty expression", 6),
])
def test_refused_at_parse_time_with_the_offset(text: str, message: str, offset: int) -> None:
    error = refused(text)
    assert error.offset == offset
    assert error.message == str(error)
    assert re.search(message, error.message), error.message


def test_syntax_error_offset_counts_the_stripped_wrapping() -> None:
    text = "  ${{  params.n > ) }}"
    error = refused(text)
    assert error.message == "invalid expression: unmatched ')'"
    assert text[error.offset] == ")"


def test_item_is_only_a_name_where_the_caller_allows_it() -> None:
    error = refused("item.score > 1", ("params", "steps"))
    assert error.message == "unknown name 'item' (names here: params, steps)"
    assert parse_expression("item.score > 1 and index < 3", ("item", "index")).evaluate(
        {"item": {"score": 2}, "index": 0}) is True


def test_text_longer_than_the_limit() -> None:
    error = refused("params.n + " * 91 + "1")
    assert "the limit is 1000" in error.message
    assert parse_expression("params.n + " * 90 + "1").evaluate(NAMES) == 451


@pytest.mark.parametrize(("text", "names", "message"), [
    ("'a' < 3", NAMES, "'<' not supported between instances of 'str' and 'int'"),
    ("len(5)", NAMES, "object of type 'int' has no len()"),
    ("params.n / params.zero", NAMES, "division by zero"),
    ("params.name.upper", NAMES, "cannot look up 'upper' in a string"),
    ("(3).real", NAMES, "cannot look up 'real' in a number"),
    ("params.tags.x", NAMES, "cannot look up 'x' in a list"),
    ("params.name[0]", NAMES, r"cannot look up item \[0\] in a string"),
    ("lower(params.n)", NAMES, "lower\\(\\) takes a string, not a number"),
    ("int('seven')", NAMES, "invalid literal for int"),
    ("params.missing > 1", NAMES, "not supported between instances of 'NoneType' and 'int'"),
    ("'%s' % params.n", NAMES, "'%' is the remainder of numbers"),
    ("'ab' * 60000", NAMES, "longer than 100000 characters"),
    ("upper(params.s)", {"params": {"s": "ß" * 60000}}, "longer than 100000 characters"),
    ("params.big * params.big", {"params": {"big": 10**4000}}, "more than 4300 digits"),
    ("round(1, -100000)", NAMES, "round\\(\\) to more than 4300 digits"),
    ("item", NAMES, "'item' has no value here \\(defined: params, steps\\)"),
    ("params.obj.x", {"params": {"obj": SimpleNamespace(x=1)}}, "cannot look up 'x' in SimpleNamespace"),
    ("params.f", {"params": {"f": print}}, "not a value an expression can use"),
])
def test_evaluation_errors_are_expression_errors(text: str, names: dict, message: str) -> None:
    expression = parse_expression(text, ("params", "steps", "item"))
    with pytest.raises(ExpressionError, match=message) as info:
        expression.evaluate(names)
    assert info.value.message.startswith(f"cannot evaluate `{text}`: ")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_evaluate_does_not_parse_again(monkeypatch: pytest.MonkeyPatch) -> None:
    expression = parse_expression("params.n > 3")

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("parsed again")

    monkeypatch.setattr(ast, "parse", no_parse)
    assert expression.test(NAMES) is True


def test_one_expression_from_many_threads() -> None:
    expression = parse_expression("${{ item.n * 2 + index if item.n > 3 else 'small' }}", ("item", "index"))
    start = threading.Barrier(8)
    results: dict[int, list[object]] = {}

    def work(n: int) -> None:
        start.wait()
        results[n] = [expression.evaluate({"item": {"n": n}, "index": i}) for i in range(2000)]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n in range(8):
        assert results[n] == ["small" if n <= 3 else n * 2 + i for i in range(2000)]
