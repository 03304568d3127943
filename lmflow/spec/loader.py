"""Read YAML while keeping the line and column of every value and key.

Every YAML file lmflow reads goes through `load_yaml`, so every later error
can point at `file:line:col` and the path in the document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import Problem, SpecError

try:  # the C composer is ~10x faster on large specs
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML without libyaml
    _Loader = yaml.SafeLoader

PathT = tuple[Any, ...]

#: a document from an untrusted source stays small once its aliases are expanded (a spec has
#: hundreds of values; an alias bomb has billions) and shallow (a spec nests about ten deep)
MAX_VALUES = 100_000
MAX_DEPTH = 64


class _Refused(Exception):
    """A node lmflow will not build (the document is too big or too deep, or asks for a type)."""

    def __init__(self, node: yaml.Node, message: str, hint: str):
        self.node, self.message, self.hint = node, message, hint


def format_path(path: PathT) -> str:
    """`("steps", 2, "prompt")` -> `steps[2].prompt`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class Document:
    """A parsed YAML document and where each of its parts was written."""

    file: str
    data: Any
    values: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list, repr=False)  # the source, for columns inside values

    def position(self, path: PathT, *, key: bool = False) -> tuple[int | None, int | None]:
        """Line and column (1-based) of `path`, or of its nearest known ancestor."""
        path = tuple(path)
        while True:
            table = self.keys if key and path in self.keys else self.values
            if path in table:
                return table[path]
            if not path:
                return None, None
            path = path[:-1]

    def problem(
        self, path: PathT, message: str, hint: str | None = None, *, key: bool = False
    ) -> Problem:
        line, col = self.position(path, key=key)
        return Problem(self.file, line, col, format_path(path), message, hint)


class _Builder:
    """Python values from composed YAML nodes, with positions, duplicate keys found, and bounds:
    at most MAX_VALUES values once aliases are expanded, MAX_DEPTH levels, no alias inside itself."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.problems: list[Problem] = []
        self._scalars = yaml.constructor.SafeConstructor()
        self._built = 0
        self._open: set[int] = set()  # the collections being built (an alias to one is a cycle)

    def build(self, node: yaml.Node, path: PathT) -> Any:
        self._built += 1
        if self._built > MAX_VALUES:
            raise _Refused(node, f"the document has more than {MAX_VALUES} values once its aliases are "
                          "expanded",
                          "an alias (*name) repeats its anchor's whole value: do not nest them")
        if len(path) > MAX_DEPTH:
            raise _Refused(node, f"the document is nested more than {MAX_DEPTH} levels deep",
                          "flatten the document")
        if id(node) in self._open:
            raise _Refused(node, "an alias refers to a value that contains it (a cycle)",
                          "an alias (*name) may only repeat a value defined before, outside it")
        self.doc.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            self._open.add(id(node))
            try:
                return self._collection(node, path)
            finally:
                self._open.discard(id(node))
        try:
            return self._scalars.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise _Refused(node, f"the tag {node.tag} is not allowed",
                           "a spec holds plain values: strings, numbers, booleans, lists and mappings"
                           ) from None

    def _collection(self, node: yaml.Node, path: PathT) -> Any:
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    merged = self.build(value_node, path)
                    for item in merged if isinstance(merged, list) else [merged]:
                        if isinstance(item, dict):
                            for k, v in item.items():
                                result.setdefault(k, v)
                    continue
                key = self.build(key_node, path + ("<key>",))
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    key = str(key)
                child = path + (key,)
                self.doc.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key in result:
                    self.problems.append(
                        self.doc.problem(
                            child,
                            f"duplicate key '{key}'",
                            "YAML keeps only the last one; remove or rename the other",
                            key=True,
                        )
                    )
                result[key] = self.build(value_node, child)
            return result
        return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]


def parse_yaml(text: str, file: str) -> Document:
    """Parse YAML text; raise SpecError with positions on syntax errors or duplicate keys."""
    doc = Document(file=file, data=None, lines=text.splitlines())
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        what = " ".join(filter(None, [exc.context, exc.problem]))
        if "nesting depth" in what:  # libyaml's own limit (PyYAML >= 6.0.3), hit before ours
            raise SpecError([Problem(file, line, col, "", "the document is nested more than "
                                     f"{MAX_DEPTH} levels deep", "flatten the document")]) from None
        raise SpecError(
            [Problem(file, line, col, "", f"YAML syntax error: {what}", "fix the YAML syntax")]
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(file, None, None, "", f"YAML error: {exc}")]) from None
    except RecursionError:
        raise SpecError([Problem(file, None, None, "", "the document is nested more than "
                                 f"{MAX_DEPTH} levels deep", "flatten the document")]) from None
    if node is None:
        return doc
    builder = _Builder(doc)
    try:
        doc.data = builder.build(node, ())
    except _Refused as exc:
        mark = exc.node.start_mark
        raise SpecError([Problem(file, mark.line + 1, mark.column + 1, "",
                                 exc.message, exc.hint)]) from None
    if builder.problems:
        raise SpecError(builder.problems)
    return doc


def load_yaml(path: str | Path) -> Document:
    """Read and parse a YAML file; a missing or unreadable file is a SpecError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            [Problem(str(path), None, None, "", "file not found", "check the path")]
        ) from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise SpecError([Problem(str(path), line, None, "", f"not UTF-8 text (byte {exc.start} is "
                                 f"0x{exc.object[exc.start]:02x})", "save the file as UTF-8")]) from None
    except OSError as exc:
        raise SpecError([Problem(str(path), None, None, "", f"cannot read file: {exc}")]) from None
    return parse_yaml(text, str(path))
