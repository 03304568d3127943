from __future__ import annotations

import pytest

from lmflow.spec.templates import TemplateError, parse_ref, render

CONTEXT = {"params": {"n": 3, "topic": "moon"},
           "steps": {"a": {"output": {"items": [{"x": 1}], "name": "Ada"}}, "b": {"output": "text"}}}


def test_whole_reference_keeps_its_type() -> None:
    assert render("${{ params.n }}", CONTEXT) == 3
    assert render("${{ steps.a.output.items[0] }}", CONTEXT) == {"x": 1}


def test_interpolation_turns_values_into_text() -> None:
    assert render("n=${{params.n}} of ${{ steps.a.output.items }}", CONTEXT) == 'n=3 of [{"x": 1}]'


def test_nested_values_and_escape() -> None:
    assert render({"a": ["${{ steps.b.output }}", "$${{ literal }}"]}, CONTEXT) == {
        "a": ["text", "${{ literal }}"]}


def test_data_is_never_template_syntax() -> None:
    # what a reference puts into a longer text stays as it was: `$${{` in data is not an escape
    context = {"params": {"text": "costs $${{ price }} and ${{ params.n }}"}}
    assert render("say: ${{ params.text }}!", context) == "say: costs $${{ price }} and ${{ params.n }}!"
    assert render("${{ params.text }}", context) == context["params"]["text"]
    assert render("$${{ a }} ${{ params.text }} $${{", context) == (
        "${{ a }} costs $${{ price }} and ${{ params.n }} ${{")


def test_missing_field_says_what_exists() -> None:
    with pytest.raises(TemplateError) as info:
        render("${{ steps.a.output.nme }}", CONTEXT)
    assert str(info.value) == ("steps.a.output.nme: steps.a.output has no key 'nme' (keys: items, name; "
                               "did you mean 'name'?)")
    with pytest.raises(TemplateError, match=r"has no item \[5\] \(it has 1\)"):
        render("${{ steps.a.output.items[5] }}", CONTEXT)
    with pytest.raises(TemplateError, match=r"steps.b.output has no key 'x' \(it is a string\)"):
        render("${{ steps.b.output.x }}", CONTEXT)


def test_an_error_says_where_in_the_value_the_reference_is() -> None:
    with pytest.raises(TemplateError) as info:
        render({"args": {"rows": [1, "n=${{ steps.a.output.itms }}"]}}, CONTEXT, ("python",))
    assert str(info.value) == ("python.args.rows[1]: steps.a.output.itms: steps.a.output has no key 'itms' "
                               "(keys: items, name; did you mean 'items'?)")


def test_a_map_s_items_sit_next_to_its_output() -> None:
    context = {"steps": {"m": {"output": [{"a": 1}], "items": [{"text": "x"}]}, "skipped": {"output": None,
                                                                                         "items": None}}}
    assert render("${{ steps.m.items[0].text }}", context) == "x"
    assert render("${{ steps.skipped.items[0].text }}", context) is None
    assert parse_ref("steps.m.items").parts == ("m", "items")


@pytest.mark.parametrize("expr", ["os.system('x')", "params", "params.a.b", "steps.a",
                                  "steps.a.result", "steps.a.input", "params.n + 1", "__import__('os')"])
def test_anything_but_a_dotted_reference_is_rejected(expr: str) -> None:
    with pytest.raises(TemplateError):
        parse_ref(expr)


def test_two_references_in_one_string_are_two() -> None:
    from lmflow.spec.templates import is_whole_reference, render

    assert not is_whole_reference("${{ item.a }}-${{ item.b }}")
    assert render("${{ item.a }}-${{ item.b }}", {"item": {"a": 1, "b": "x"}}) == "1-x"
    assert render("${{ item }}", {"item": {"a": 1}}) == {"a": 1}


def test_a_function_in_a_template_says_where_functions_work() -> None:
    with pytest.raises(TemplateError) as info:
        parse_ref("count(steps.a.output)")
    assert str(info.value).endswith("(a ${{ }} in an option holds one reference; functions such as count() "
                                    "work in when: conditions)")
    with pytest.raises(TemplateError) as plain:
        parse_ref("foo.bar")
    assert "functions" not in str(plain.value)
