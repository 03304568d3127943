"""The safe template syntax: `${{ params.name }}`, `${{ steps.ID.output.field }}` (and a map's
items, `${{ steps.ID.items }}`: item i is the one whose output is output[i]), in a
step with `foreach` `${{ item.field }}` and `${{ index }}`, and in the steps a kind holds
the root that kind offers them (`Step.holds`): in a loop's checkpoint `${{ loop.generation }}`,
`${{ loop.state.X }}`, `${{ loop.history }}`...

A reference is a dotted path, never evaluated Python. A string that is exactly
one reference takes the referenced value with its type (a number stays a
number, an object stays an object); references inside longer text are
interpolated (objects as JSON). `$${{` writes a literal `${{`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import TemplateError  # noqa: F401 - raised here, defined with the tree
from ..plugins import by_version
from .hints import known_keys

if TYPE_CHECKING:
    from ..steps.base import Holds

# the expression never spans a `}}`: "${{ a }}-${{ b }}" is two references, not one
_TEMPLATE = re.compile(r"(?<!\$)\$\{\{((?:(?!\}\}).)*)\}\}", re.S)
#: one pass over a text: `$${{` (a literal `${{`) or a reference; what a reference puts in is data,
#: never read again for either
_PIECE = re.compile(r"\$\$\{\{|\$\{\{((?:(?!\}\}).)*)\}\}", re.S)
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]")
#: the roots of every spec; each kind that holds steps adds its own (`held_roots`)
ROOTS = ("params", "steps", "item", "index")
#: what `steps.ID.` offers: the step's output, and a map's items next to it (in the same order)
STEP_FIELDS = ("output", "items")


@by_version
def held_roots() -> dict[str, Holds]:
    """The roots that kinds holding steps offer them (`loop` -> the loop kind's `Holds`)."""
    from ..steps import kinds

    return {k.holds.root: k.holds for k in kinds().values() if k.holds is not None}


@dataclass(frozen=True)
class Ref:
    """One parsed reference such as `steps.ask.output.answer`."""

    root: str
    parts: tuple[str | int, ...]
    text: str

    @property
    def step(self) -> str | None:
        return str(self.parts[0]) if self.root == "steps" and self.parts else None

    @property
    def field_path(self) -> tuple[str | int, ...]:
        """For a step reference, the path inside the step's output (or items)."""
        return self.parts[2:] if self.root == "steps" else ()


def parse_ref(expr: str) -> Ref:
    text = expr.strip()
    root, _, rest = text.partition(".")
    root_match = re.fullmatch(r"[A-Za-z_]\w*", root)
    held = held_roots()
    if not root_match or (root not in ROOTS and root not in held):
        called = re.match(r"\s*([A-Za-z_]\w*)\s*\(", text)
        raise TemplateError(f"unknown reference '{text}': a reference starts with 'params.', "
                            "'steps.', in a step with foreach 'item' or 'index'"
                            + "".join(f", in {h.defined_in} '{r}.'" for r, h in held.items())
                            + (f" (a ${{{{ }}}} in an option holds one reference; functions such as "
                               f"{called.group(1)}() work in when: conditions)" if called else ""))
    parts: list[str | int] = []
    tail = "." + rest if rest else ""
    pos = 0
    while pos < len(tail):
        match = _SEGMENT.match(tail, pos)
        if not match:
            raise TemplateError(
                f"cannot parse reference '{text}' at '{tail[pos:]}': use dotted names "
                "and [index], e.g. steps.ask.output.items[0]"
            )
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    if not parts and root not in ("item", "index"):
        raise TemplateError(f"incomplete reference '{text}'")
    if root == "index" and parts:
        raise TemplateError(f"'{text}': the item's position is just `index`")
    if root in held and (not parts or parts[0] not in held[root].fields):
        raise TemplateError(f"'{text}': a {root} reference is {root}.FIELD, FIELD one of "
                            + ", ".join(held[root].fields))
    if root == "params" and len(parts) != 1:
        raise TemplateError(f"'{text}': a parameter reference is params.NAME")
    if root == "steps" and (len(parts) < 2 or parts[1] not in STEP_FIELDS):
        raise TemplateError(f"'{text}': a step reference is steps.ID.output[.field...] (or a map's "
                            "items: steps.ID.items)")
    return Ref(root, tuple(parts), text)


def is_whole_reference(value: str) -> bool:
    """True for a string that is exactly one `${{ }}` (it takes the value's type)."""
    return _TEMPLATE.fullmatch(value.strip()) is not None


def iter_templates(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """Yield (path, expression) for every `${{ }}` inside a nested value."""
    if isinstance(value, str):
        for match in _TEMPLATE.finditer(value):
            yield path, match.group(1)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_templates(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from iter_templates(item, path + (i,))


def lookup(ref: Ref, context: dict[str, Any]) -> Any:
    """Resolve one reference in {"params": ..., "steps": {id: {"output": ...}}, "item": ..., "index": ...}.

    A step skipped because its condition was false has the output null, and so has every
    field of a null output: its dependents can test for it instead of failing.
    """
    held = ref.root not in ROOTS  # a root a kind offers the steps it holds (`loop`)
    if ref.root not in context:
        where = held_roots()[ref.root].defined_in if held else "a step with foreach"
        raise TemplateError(f"{ref.text}: '{ref.root}' is only defined in {where}")
    current: Any = context[ref.root]
    walked = ref.root
    for n, part in enumerate(ref.parts):
        if current is None and (ref.root == "steps" and n >= 2 or held and n >= 1):
            return None
        if isinstance(part, int):
            if not is_list(current) or part >= len(current):
                size = f"it has {len(current)}" if is_list(current) else f"it is {kind_of(current)}"
                raise TemplateError(f"{ref.text}: {walked} has no item [{part}] ({size})")
            current = current[part]
            walked += f"[{part}]"
        else:
            if not isinstance(current, dict) or part not in current:
                found = (known_keys(part, current) if isinstance(current, dict)
                         else f"it is {kind_of(current)}")
                raise TemplateError(f"{ref.text}: {walked} has no key '{part}' ({found})")
            current = current[part]
            walked += f".{part}"
    return current


def value_of(text: str, context: dict[str, Any]) -> Any:
    """The value of a string that is one reference, as it is: a sequence read on demand (a map's
    output on disk, for a `foreach` over it) stays one."""
    whole = _TEMPLATE.fullmatch(text.strip())
    assert whole is not None, text
    return lookup(parse_ref(whole.group(1)), context)


def is_list(value: Any) -> bool:
    """A list, or a sequence read on demand (a dataset's rows, a big map's output)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def kind_of(value: Any) -> str:
    """A value's type as a spec writer knows it: null, a number, a list, an object..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if is_list(value):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def as_value(value: Any) -> Any:
    """`value` as a step's options hold it: a sequence read on demand (a map's output on disk)
    becomes a list, as the step is given it whole."""
    return list(value) if is_list(value) and not isinstance(value, (list, tuple)) else value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(as_value(value), ensure_ascii=False)


def render(value: Any, context: dict[str, Any], path: tuple[str | int, ...] = ()) -> Any:
    """Resolve every reference inside a nested value (strings, lists, dicts); an error says where
    in it the reference is, after `path` (`python.args.text: steps.a.output has no key...`)."""
    if isinstance(value, str):
        try:
            whole = _TEMPLATE.fullmatch(value)
            if whole:
                return as_value(lookup(parse_ref(whole.group(1)), context))
            return _PIECE.sub(lambda m: "${{" if m.group(1) is None
                              else _as_text(lookup(parse_ref(m.group(1)), context)), value)
        except TemplateError as exc:
            if not path:
                raise
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
            raise TemplateError(f"{where}: {exc}") from None
    if isinstance(value, dict):
        return {k: render(v, context, path + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context, path + (i,)) for i, v in enumerate(value)]
    return value
