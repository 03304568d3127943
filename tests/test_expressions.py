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
    ("'a' < 3", NAMES, "'<' does not apply to a string and a number"),
    ("'x' in 3", NAMES, "'in' does not apply to a string and a number"),
    ("'a' - 1", NAMES, "'-' does not apply to a string and a number"),
    ("-'a'", NAMES, "'-' does not apply to a string"),
    ("len(5)", NAMES, "object of type 'int' has no len()"),
    ("params.n / params.zero", NAMES, "division by zero"),
    ("params.name.upper", NAMES, "cannot look up 'upper' in a string"),
    ("(3).real", NAMES, "cannot look up 'real' in a number"),
    ("params.tags.x", NAMES, "cannot look up 'x' in a list"),
    ("params.name[0]", NAMES, r"cannot look up item \[0\] in a string"),
    ("lower(params.n)", NAMES, "lower\\(\\) takes a string, not a number"),
    ("int('seven')", NAMES, "invalid literal for int"),
    ("params.missing > 1", NAMES, "'>' does not apply to null and a number: params has no key 'missing'"),
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


# -- a null that breaks an expression says where it came from -----------------------------------------

URGENT = {"steps": {"urgent": {"output": {"urgent": 1, "count": 3}}, "skipped": {"output": None},
                    "triage": {"output": [{"urgent": True, "tokens": 3}, {"urgent": False, "tokens": 4},
                                          {"label": "spam"}]},
                    "nested": {"output": [{"a": {"b": 1}}, {"a": {}}, {}]}},
          "params": {"limit": None}}


def failure(text: str, names: dict = URGENT) -> str:
    with pytest.raises(ExpressionError) as info:
        parse_expression(text).evaluate(names)
    return info.value.message


def test_a_typo_in_a_key_names_the_key_the_keys_there_are_and_the_closest() -> None:
    assert failure("steps.urgent.output.urgnet > 0") == (
        "cannot evaluate `steps.urgent.output.urgnet > 0`: '>' does not apply to null and a number: "
        "steps.urgent.output has no key 'urgnet' (keys: count, urgent; did you mean 'urgent'?)")
    # a missing key is still null where null is fine
    assert parse_expression("steps.urgent.output.urgnet == null").evaluate(URGENT) is True
    assert parse_expression("steps.urgent.output.urgnet").test(URGENT) is False
    assert parse_expression("1 if steps.urgent.output.urgnet else 2").evaluate(URGENT) == 2


@pytest.mark.parametrize(("text", "message"), [
    ("len(steps.urgent.output.itms)", "len() does not take null: steps.urgent.output has no key 'itms' "
     "(keys: count, urgent)"),
    ("steps.skipped.output.label > 1",
     "'>' does not apply to null and a number: steps.skipped.output is null"),
    ("steps.urgent.output.nope.deeper + 1", "'+' does not apply to null and a number: "
     "steps.urgent.output has no key 'nope' (keys: count, urgent)"),
    ("params.limit * 2", "'*' does not apply to null and a number: params.limit is null"),
    ("-steps.urgent.output.cont", "'-' does not apply to null: steps.urgent.output has no key 'cont' "
     "(keys: count, urgent; did you mean 'count'?)"),
    ("'x' in steps.urgent.output.labels", "'in' does not apply to a string and null: "
     "steps.urgent.output has no key 'labels' (keys: count, urgent)"),
    ("steps.triage.output[steps.urgent.output.idx]", "cannot look up null in a list (only objects have "
     "keys, only lists have items): steps.urgent.output has no key 'idx' (keys: count, urgent)"),
    ("steps.triage.output[7].urgent < 1", "'<' does not apply to null and a number: "
     "steps.triage.output has no item [7] (it has 3)"),
    ("lower(steps.urgent.output['Urgent'])", "lower() takes a string, not null: steps.urgent.output has no "
     "key 'Urgent' (keys: count, urgent; did you mean 'urgent'?)"),
    ("max(steps.urgent.output.cuont, 2)", "max() compares numbers or strings; item [0] is null: "
     "steps.urgent.output has no key 'cuont' (keys: count, urgent; did you mean 'count'?)"),
    ("sum(pluck(steps.triage.output, 'tokns'))", "sum() adds numbers; item [0] is null: "
     "steps.triage.output[0] has no key 'tokns' (keys: tokens, urgent; did you mean 'tokens'?)"),
    ("max(pluck(steps.triage.output, 'tokens'))", "max() compares numbers or strings; item [2] is null: "
     "steps.triage.output[2] has no key 'tokens' (keys: label)"),
    ("sum(pluck(pluck(steps.nested.output, 'a'), 'b'))", "sum() adds numbers; item [1] is null: "
     "pluck(steps.nested.output, 'a')[1] has no key 'b' (it has no keys)"),
    ("sum(pluck(pluck(where(steps.nested.output, 'a', null), 'a'), 'b'))", "sum() adds numbers; item [0] is "
     "null: where(steps.nested.output, 'a', null)[0] has no key 'a' (it has no keys)"),
    ("max(pluck(pluck(steps.nested.output, 'a'), 'b')) > 0", "max() compares numbers or strings; "
     "item [1] is null: pluck(steps.nested.output, 'a')[1] has no key 'b' (it has no keys)"),
    # a null that is not what broke the expression is not blamed
    ("steps.urgent.output.x == null and 'a' < 3", "'<' does not apply to a string and a number"),
    ("null > 1", "'>' does not apply to null and a number"),
])
def test_where_the_null_that_broke_it_came_from(text: str, message: str) -> None:
    assert failure(text) == f"cannot evaluate `{text}`: {message}"


def test_a_big_object_lists_its_first_keys() -> None:
    names = {"params": {"obj": {f"k{i:03}": i for i in range(50)}}}
    assert failure("params.obj.k1000 > 1", names).endswith(
        "params.obj has no key 'k1000' (keys: k000, k001, k002, k003, k004, k005, k006, k007, k008, k009, "
        "k010, k011, k012, k013, k014, k015, k016, k017, k018, k019, ... (50 in all); did you mean 'k000'?)")


# -- functions over lists -----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("any([0, '', 2])", True), ("any([])", False), ("all([1, 'a'])", True), ("all([1, null])", False),
    ("all([])", True), ("count([true, 0, 'x', null, 3])", 3), ("sum([1, 2.5, -1])", 2.5), ("sum([])", 0),
    ("any(pluck(steps.triage.output, 'urgent'))", True),
    ("all(pluck(steps.triage.output, 'urgent'))", False),
    ("count(pluck(steps.triage.output, 'urgent')) > 0", True),
    ("pluck(steps.triage.output, 'urgent')", [True, False, None]),
    ("pluck(steps.triage.output, 'urgent') == [true, false, null]", True),
    ("len(pluck(steps.triage.output, 'urgent'))", 3),
    ("pluck(steps.triage.output, 'urgent')[1]", False),
    ("sum(pluck(where(steps.triage.output, 'tokens'), 'tokens'))", 7),
    ("where(steps.triage.output, 'label', 'spam')", [{"label": "spam"}]),
    ("count(where(steps.triage.output, 'urgent', false))", 1),  # an object with keys is true
    ("len(where(steps.triage.output, 'urgent', false))", 1),
    ("len(where(steps.triage.output, 'urgent'))", 1),
    ("where(steps.triage.output, 'nothing')", []),
    ("'spam' in pluck(steps.triage.output, 'label')", True),
    ("contains(pluck(steps.triage.output, 'label'), 'ham')", False),
    ("pluck(steps.triage.output, 'urgent') + [1]", [True, False, None, 1]),
    ("[1] + pluck(steps.triage.output, 'urgent')", [1, True, False, None]),
    ("max(pluck(where(steps.triage.output, 'tokens'), 'tokens'))", 4),
    ("pluck(pluck(steps.nested.output, 'a'), 'b')", [1, None, None]),
    ("any(steps.skipped.output or [])", False),
])
def test_list_functions(text: str, expected: object) -> None:
    assert parse_expression(text).evaluate(URGENT) == expected


ONLY = "(only objects have keys, only lists have items)"


@pytest.mark.parametrize(("text", "message"), [
    ("any(steps.urgent.output)", "any() takes a list, not an object"),
    ("count('abc')", "count() takes a list, not a string"),
    ("sum(['1', 2])", "sum() adds numbers; item [0] is a string"),
    ("sum([true])", "sum() adds numbers; item [0] is a boolean"),
    ("pluck(steps.triage.output, 1.5)", "pluck() takes a key (a string) after the list, not a number"),
    ("pluck(['a'], 'x')[0]", "cannot look up 'x' in a string " + ONLY),
    ("where([1, 2], 'x')", "cannot look up 'x' in a number " + ONLY),
    ("all(steps.skipped.output)", "all() takes a list, not null: steps.skipped.output is null"),
])
def test_list_functions_refuse_what_is_not_a_list_of_the_right_things(text: str, message: str) -> None:
    assert failure(text) == f"cannot evaluate `{text}`: {message}"


@pytest.mark.parametrize(("text", "message"), [
    ("any()", "any() takes 1 argument, not 0"),
    ("count([1], 2)", "count() takes 1 argument, not 2"),
    ("pluck([1])", "pluck() takes 2 arguments, not 1"),
    ("where([1])", "where() takes 2 to 3 arguments, not 1"),
    ("anny([1])", "unknown function 'anny' (functions: len, lower, upper, strip, startswith, endswith, "
     "contains, int, float, str, round, abs, min, max, bool, any, all, count, sum, pluck, where)"),
])
def test_list_functions_are_checked_when_parsed(text: str, message: str) -> None:
    assert refused(text).message == message


def test_list_functions_read_a_sequence_on_demand_once_without_copying_it() -> None:
    from collections.abc import Iterator, Sequence

    class Counted(Sequence):
        """A sequence read on demand (as a map's output on disk is) that counts its reads."""

        def __init__(self, rows: list) -> None:
            self.rows, self.reads = rows, 0

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, index: int) -> object:
            self.reads += 1
            return self.rows[index]

        def __iter__(self) -> Iterator[object]:
            return (self[i] for i in range(len(self)))

    rows = Counted([{"urgent": i % 1000 == 999, "n": i} for i in range(5000)])
    names = {"steps": {"m": {"output": rows}}}
    assert parse_expression("any(pluck(steps.m.output, 'urgent'))").evaluate(names) is True
    assert rows.reads == 1000  # it stops at the first true one
    rows.reads = 0
    assert parse_expression("count(pluck(steps.m.output, 'urgent')) == 5").evaluate(names) is True
    assert rows.reads == 5000
    rows.reads = 0
    urgent = parse_expression("where(steps.m.output, 'urgent', true)").evaluate(names)
    assert rows.reads == 5000 and len(urgent) == 5 and not isinstance(urgent, list)
    assert urgent[4] == {"urgent": True, "n": 4999} and rows.reads == 5001  # read again when asked for
