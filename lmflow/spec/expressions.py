"""Safe `when:` conditions, like GitHub Actions' `if:`: `${{ steps.ask.output.label == 'yes' }}`.

The language is a small subset of Python expressions:

- literals: numbers, 'strings' or "strings", true/false/null (or True/False/None), lists [1, 2];
- names: only the roots the caller allows (params, steps, and item/index/loop where defined);
- `a.b` and `a['b']` look up a key of an object, `a[0]` an item of a list. A missing key or
  item is null, and so is any lookup on null; a lookup on anything else is an error. Names
  and `.keys` starting with `_` are refused (write `a['_key']` for such a key);
- operators: == != < <= > >= in, not in, and, or, not, + - * / // %, unary -, `x if c else y`,
  with Python's semantics (`'1' == 1` is false, `'a' < 3` is an error);
- functions: len lower upper strip startswith(s, prefix) endswith(s, suffix) contains(c, x)
  int float str round abs min max bool, called by name (no methods);
- functions over lists (lmflow.spec.expression_functions): any(list) all(list) count(list)
  (how many items are true) sum(list) (of numbers), pluck(list, 'key') (each item's key, null
  where an item lacks it) and where(list, 'key') / where(list, 'key', value) (the items whose
  key is true / equals value): `any(pluck(steps.triage.output, 'urgent'))`,
  `count(where(steps.triage.output, 'label', 'spam')) > 2`. Each reads its list once, item by
  item, and copies nothing (a map's output on disk stays there); there are no comprehensions:
  these are the bounded forms of `[x.urgent for x in ...]`;
- line breaks count as spaces; at most 1000 characters; results may not exceed
  100,000 characters or 4300 digits.

When a null breaks an operation or a function (`steps.a.output.urgnet > 0`), the error says
where the null came from: the key an object lacks, with the keys it has and the closest one
(`steps.a.output has no key 'urgnet' (keys: count, urgent; did you mean 'urgent'?)`), or the
value that was null.

`test` is the truthiness of the value, as in GitHub Actions: null, false, 0, "", [] and {}
are false. Everything else (lambda, comprehensions, `**`, f-strings, slices, ...) is refused
when the expression is parsed, with the offset of the offending part. Evaluation runs on
simpleeval with the parsed tree, so an expression is parsed once and evaluated many times.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
import types
from collections.abc import Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import simpleeval
from simpleeval import InvalidExpression, IterableTooLong, SimpleEval

from ..errors import ExpressionError  # noqa: F401 - raised here, defined with the tree
from .expression_functions import (
    FUNCTIONS,
    MAX_DIGITS,  # noqa: F401 - a limit of the language, said here with the others
    NullUsed,
    Picked,
    Refused,
    checked,
    kind,
    lookup,
    missing,
)
from .hints import suggest
from .templates import is_list

MAX_LENGTH = 1000
MAX_DEPTH = 100

_LITERALS = {"true": True, "false": False, "null": None}
_WRAPPED = re.compile(r"\s*\$\{\{(.*)\}\}\s*", re.S)


@dataclass(frozen=True)
class Reference:
    """A root and the constant keys after it: `steps.ask.output.x` -> steps, ("ask", "output", "x")."""

    root: str
    path: tuple[str | int, ...]
    offset: int


@dataclass(frozen=True)
class Expression:
    """A parsed expression; evaluate it as often as needed, from any thread."""

    text: str
    references: tuple[Reference, ...]
    _tree: ast.expr = field(repr=False, compare=False)

    def evaluate(self, names: dict[str, Any]) -> Any:
        """The value of the expression with the roots bound to `names`."""
        token, trace = _NAMES.set(names), _TRACE.set(_Trace())
        try:
            # eval() keeps the text on the shared evaluator for simpleeval's own messages, which
            # are never shown: the one attribute threads race on, harmlessly
            return _EVALUATOR.eval(self.text, previously_parsed=self._tree)
        except (InvalidExpression, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise ExpressionError(f"cannot evaluate `{self.text}`: {_reason(exc)}") from None
        finally:
            _TRACE.reset(trace)
            _NAMES.reset(token)

    def test(self, names: dict[str, Any]) -> bool:
        """Whether the value is true (null, false, 0, "", [] and {} are not)."""
        return bool(self.evaluate(names))


def parse_expression(text: str, roots: Collection[str] | None = None) -> Expression:
    """Parse `params.n > 3` or `${{ params.n > 3 }}` over `roots` (default: every root, those the
    kinds holding steps offer included); errors carry offsets into `text`."""
    if roots is None:
        from .templates import ROOTS, held_roots

        roots = ROOTS + tuple(held_roots())
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is {len(text)} characters long; the limit is {MAX_LENGTH}",
                              MAX_LENGTH)
    start, end = _bounds(text)
    body = text[start:end]
    if not body:
        raise ExpressionError("empty expression", start)
    source = body.replace("\r", " ").replace("\n", " ")  # same length, so offsets still match
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError as exc:
        raise ExpressionError(f"invalid expression: {exc.msg}{_syntax_hint(source)}",
                              start + _syntax_offset(exc, source)) from None
    except (ValueError, RecursionError, MemoryError):  # null bytes; nesting that exhausts the parser
        raise ExpressionError("invalid expression: too complex", start) from None
    checker = _Checker(source, start, frozenset(roots))
    checker.visit(tree, 0)
    references = tuple(sorted(checker.references, key=lambda ref: ref.offset))
    return Expression(body, references, tree)


# -- parsing ------------------------------------------------------------------------------------------

def _bounds(text: str) -> tuple[int, int]:
    """Where the expression starts and ends in `text`, inside an optional `${{ }}`."""
    wrapped = _WRAPPED.fullmatch(text)
    start, end = wrapped.span(1) if wrapped else (0, len(text))
    inner = text[start:end]
    return start + len(inner) - len(inner.lstrip()), end - len(inner) + len(inner.rstrip())


def _syntax_offset(exc: SyntaxError, source: str) -> int:
    # SyntaxError.offset counts characters from 1; 0 or None means "at the end"
    if not exc.offset or exc.offset > len(source):
        return len(source)
    return exc.offset - 1


def _syntax_hint(source: str) -> str:
    if "${{" in source:
        return " (write the whole condition in one ${{ }} or none, e.g. ${{ a == 'x' }})"
    if "&&" in source or "||" in source or re.search(r"(^|[\s(])!(?!=)", source):
        return " (write and, or, not instead of &&, ||, !)"
    return ""


_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod)
_REFUSED_OPERATORS = {
    ast.Pow: "'**'", ast.MatMult: "'@'", ast.LShift: "'<<'", ast.RShift: "'>>'",
    ast.BitAnd: "'&' (write and)", ast.BitOr: "'|' (write or)", ast.BitXor: "'^'",
    ast.Invert: "'~' (write not)", ast.UAdd: "unary '+'", ast.Is: "'is' (write ==)",
    ast.IsNot: "'is not' (write !=)",
}
_REFUSED_NODES = {
    ast.Lambda: "lambda", ast.ListComp: "comprehensions", ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions", ast.GeneratorExp: "comprehensions", ast.JoinedStr: "f-strings",
    ast.NamedExpr: "':=' (walrus)", ast.Dict: "dict literals", ast.Set: "set literals",
    ast.Starred: "'*' unpacking", ast.Slice: "slices", ast.Await: "await", ast.Yield: "yield",
    ast.YieldFrom: "yield",
}


class _Checker:
    """The static pass: refuses what the language lacks and collects the references."""

    def __init__(self, source: str, start: int, roots: frozenset[str]):
        self.source = source
        self.start = start
        self.roots = roots
        self.references: list[Reference] = []
        self._encoded = None if source.isascii() else source.encode()

    def at(self, col: int) -> int:
        """The offset in the original text of a column of the ast (counted in UTF-8 bytes)."""
        if self._encoded is not None:
            col = len(self._encoded[:col].decode())
        return self.start + col

    def node_at(self, node: ast.expr) -> int:
        return self.at(node.col_offset)

    def name_at(self, node: ast.Attribute) -> int:
        """Where the name after the dot of `a.name` starts."""
        return self.at(node.end_col_offset or 0) - len(node.attr)

    def operator_at(self, left: ast.expr, right: ast.expr) -> int:
        """Where the operator between two operands is (the ast does not say)."""
        after_left, before_right = self.at(left.end_col_offset or 0), self.node_at(right)
        gap = self.source[after_left - self.start:before_right - self.start]
        return after_left + len(gap) - len(gap.lstrip(" \t()"))

    def visit(self, node: ast.expr, depth: int) -> None:
        depth = self.deeper(node, depth)
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (str, int, float, bool, type(None))):
                raise _refused(f"{type(node.value).__name__} literals", self.node_at(node))
        elif isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)):
            self.visit_lookup(node, depth)
        elif isinstance(node, (ast.List, ast.Tuple)):
            for element in node.elts:
                self.visit(element, depth)
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self.visit(value, depth)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.Not, ast.USub)):
                raise _refused(_REFUSED_OPERATORS[type(node.op)], self.node_at(node))
            self.visit(node.operand, depth)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _ARITHMETIC:
                raise _refused(_REFUSED_OPERATORS[type(node.op)], self.operator_at(node.left, node.right))
            self.visit(node.left, depth)
            self.visit(node.right, depth)
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(node.ops):
                if type(op) not in _COMPARISONS:
                    at = self.operator_at(operands[i], operands[i + 1])
                    raise _refused(_REFUSED_OPERATORS[type(op)], at)
            for operand in operands:
                self.visit(operand, depth)
        elif isinstance(node, ast.IfExp):
            for part in (node.test, node.body, node.orelse):
                self.visit(part, depth)
        elif isinstance(node, ast.Call):
            self.visit_call(node, depth)
        else:
            raise _refused(_REFUSED_NODES.get(type(node), type(node).__name__), self.node_at(node))

    def deeper(self, node: ast.expr, depth: int) -> int:
        # simpleeval recurses once per level: a limit here keeps it far from Python's own
        if depth >= MAX_DEPTH:
            raise ExpressionError(f"expression nests more than {MAX_DEPTH} levels deep", self.node_at(node))
        return depth + 1

    def visit_call(self, node: ast.Call, depth: int) -> None:
        func = node.func
        functions = ", ".join(FUNCTIONS)
        if isinstance(func, ast.Attribute):
            advice = (f"write {func.attr}(x) instead of x.{func.attr}()" if func.attr in FUNCTIONS
                      else f"functions: {functions}")
            raise ExpressionError(f"method calls are not allowed ({advice})", self.name_at(func))
        if not isinstance(func, ast.Name):
            raise ExpressionError(f"only these functions can be called, by name: {functions}",
                                  self.node_at(func))
        if func.id not in FUNCTIONS:
            raise ExpressionError(f"unknown function '{func.id}' (functions: {functions})",
                                  self.node_at(func))
        if node.keywords:
            raise ExpressionError(f"{func.id}() takes no keyword arguments",
                                  self.node_at(node.keywords[0].value))
        _, least, most = FUNCTIONS[func.id]
        if len(node.args) < least or (most is not None and len(node.args) > most):
            wanted = f"{least}" if least == most else f"{least} to {most}" if most else f"at least {least}"
            noun = "argument" if (most or least) == 1 else "arguments"
            raise ExpressionError(f"{func.id}() takes {wanted} {noun}, not {len(node.args)}",
                                  self.node_at(node))
        for arg in node.args:
            self.visit(arg, depth)

    def visit_lookup(self, node: ast.expr, depth: int) -> None:
        """A name with `.key`s and `[index]`es after it; its leading constant keys are a reference's path."""
        path: list[str | int] = []
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            if isinstance(node, ast.Attribute):
                if node.attr.startswith("_"):
                    raise ExpressionError(f"'.{node.attr}': names starting with '_' are not allowed "
                                          f"(write ['{node.attr}'] for such a key)", self.name_at(node))
                path.append(node.attr)
            elif isinstance(node.slice, ast.Tuple):
                raise ExpressionError("a[x, y] is not allowed: look up one key at a time",
                                      self.node_at(node.slice))
            elif (key := _constant_key(node.slice)) is not None:
                path.append(key)
            else:
                self.visit(node.slice, depth)
                path.clear()  # what follows a computed key is not a fixed path
            node = node.value
            depth = self.deeper(node, depth)
        if not isinstance(node, ast.Name):
            self.visit(node, depth)
        elif node.id not in _LITERALS:
            self.visit_name(node, tuple(reversed(path)))

    def visit_name(self, node: ast.Name, path: tuple[str | int, ...]) -> None:
        at = self.node_at(node)
        if node.id.startswith("_"):
            raise ExpressionError(f"names starting with '_' are not allowed ('{node.id}')", at)
        if node.id in FUNCTIONS:
            raise ExpressionError(f"'{node.id}' is a function: call it, e.g. {node.id}(x)", at)
        if node.id not in self.roots:
            close = suggest(node.id, self.roots) or ""
            hint = f": {close}" if close.startswith("did you mean") else ""
            allowed = ", ".join(sorted(self.roots)) or "none"
            raise ExpressionError(f"unknown name '{node.id}'{hint} (names here: {allowed})", at)
        self.references.append(Reference(node.id, path, at))


def _refused(what: str, offset: int) -> ExpressionError:
    return ExpressionError(f"not allowed in an expression: {what}", offset)


def _constant_key(node: ast.expr) -> str | int | None:
    """The key of `a['b']`, `a[0]` or `a[-1]`, or None when it is computed."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node, sign = node.operand, -1
    if not isinstance(node, ast.Constant) or type(node.value) not in (str, int):
        return None
    if type(node.value) is str:
        return node.value if sign == 1 else None
    return sign * node.value


# -- evaluation ---------------------------------------------------------------------------------------

# The names of the evaluation running in this thread (or task), and the nulls it met: the
# evaluator is shared and holds no per-call state, so one Expression can be evaluated from
# many threads at once.
_NAMES: ContextVar[dict[str, Any]] = ContextVar("lmflow_expression_names")
_TRACE: ContextVar[_Trace] = ContextVar("lmflow_expression_trace")

_SYMBOLS = {
    ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in",
    ast.NotIn: "not in", ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
    ast.Mod: "%", ast.USub: "-", ast.Not: "not",
}


@functools.lru_cache(maxsize=4096)
def _text(node: ast.expr) -> str:
    """How a part of an expression reads (`steps.ask.output`), for messages."""
    return ast.unparse(node)


class _Trace:
    """The lookups of one evaluation that gave null, and why. A missing key is null by design, so
    noting one costs a dict entry; it is said only when a null then breaks the evaluation."""

    LIMIT = 20

    def __init__(self) -> None:
        #: the text of a lookup (`steps.a.output.x`) -> what it looked into: (its text, it, the key)
        self.nulls: dict[str, tuple[str, Any, Any]] = {}

    def note(self, node: ast.Attribute | ast.Subscript, container: Any, key: Any) -> None:
        if len(self.nulls) >= self.LIMIT:
            return
        text = _text(node)
        if container is not None:
            self.nulls.setdefault(text, (_text(node.value), container, key))
        elif (inner := self.nulls.get(_text(node.value))) is not None:
            self.nulls.setdefault(text, inner)  # null because what it looks into is

    def why(self, node: ast.expr) -> str | None:
        found = self.nulls.get(_text(node))
        return missing(*found) if found is not None else None


class _Evaluator(SimpleEval):
    """simpleeval with lookups that only read keys and items, and calls only of FUNCTIONS.

    The static pass has refused everything else already; these overrides make sure no value
    from `names` is ever called or has a Python attribute read, even if that pass had a gap.
    Operations and calls given null say where the null came from (`_Trace`).
    """

    def __init__(self) -> None:
        super().__init__(operators=_OPERATORS, functions={name: f for name, (f, _, _) in FUNCTIONS.items()},
                         names={}, allowed_attrs={})
        handlers = {ast.Constant, ast.Name, ast.Attribute, ast.Subscript, ast.UnaryOp, ast.BinOp,
                    ast.BoolOp, ast.Compare, ast.IfExp, ast.Call}
        self.nodes = {kind: handler for kind, handler in self.nodes.items() if kind in handlers}
        self.nodes.update({ast.List: self._eval_list, ast.Tuple: self._eval_list})

    def _check_disallowed_items(self, item: Any) -> None:
        # simpleeval walks every result recursively (all of `steps` at each lookup) so that no
        # module or dangerous function inside it can be reached and called. Here no value is
        # ever called or has an attribute read, so a shallow check of each result is enough.
        if callable(item) or isinstance(item, types.ModuleType):
            raise TypeError(f"a {type(item).__name__} is not a value an expression can use")

    def _eval_name(self, node: ast.Name) -> Any:
        if node.id in _LITERALS:
            return _LITERALS[node.id]
        names = _NAMES.get()
        if node.id not in names:
            raise LookupError(f"'{node.id}' has no value here (defined: {', '.join(names) or 'nothing'})")
        return names[node.id]

    def _eval_attribute(self, node: ast.Attribute) -> Any:
        container = self._eval(node.value)
        value = lookup(container, node.attr)
        if value is None:
            _TRACE.get().note(node, container, node.attr)
        return value

    def _eval_subscript(self, node: ast.Subscript) -> Any:
        container, key = self._eval(node.value), self._eval(node.slice)
        try:
            value = lookup(container, key)
        except NullUsed as exc:
            raise NullUsed(str(exc), self._why([key], [node.slice])) from None
        if value is None:
            _TRACE.get().note(node, container, key)
        return value

    def _eval_unaryop(self, node: ast.UnaryOp) -> Any:
        return self._operate(node.op, [self._eval(node.operand)], [node.operand])

    def _eval_binop(self, node: ast.BinOp) -> Any:
        operands = [node.left, node.right]
        return self._operate(node.op, [self._eval(operand) for operand in operands], operands)

    def _eval_compare(self, node: ast.Compare) -> Any:
        right, right_node = self._eval(node.left), node.left
        result: Any = True
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            if not result:
                break
            left, left_node = right, right_node
            right, right_node = self._eval(comparator), comparator
            result = self._operate(op, [left, right], [left_node, right_node])
        return result

    def _operate(self, op: ast.AST, values: list[Any], nodes: list[ast.expr]) -> Any:
        try:
            return self.operators[type(op)](*values)
        except TypeError as exc:
            if isinstance(exc, (NullUsed, Refused)):
                raise
            message = f"'{_SYMBOLS[type(op)]}' does not apply to {' and '.join(map(kind, values))}"
            if any(value is None for value in values):
                raise NullUsed(message, self._why(values, nodes)) from None
            raise TypeError(message) from None

    def _eval_call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise InvalidExpression("only functions called by name with positional arguments")
        name = node.func.id
        args = [self._eval(arg) for arg in node.args]
        try:
            result = self.functions[name](*args)
        except TypeError as exc:
            given_null = any(arg is None for arg in args)
            if isinstance(exc, NullUsed) and not exc.why and given_null:
                exc.why = self._why(args, node.args)
            if isinstance(exc, NullUsed) or not given_null:
                raise
            message = f"{name}() does not take null" if "NoneType" in str(exc) else str(exc)
            raise NullUsed(message, self._why(args, node.args)) from None
        if isinstance(result, Picked):
            result.text = _text(node.args[0])
        return checked(result)

    def _eval_list(self, node: ast.List | ast.Tuple) -> list[Any]:
        return [self._eval(element) for element in node.elts]

    @staticmethod
    def _why(values: list[Any], nodes: list[ast.expr]) -> list[str]:
        """Where each null among `values` came from, where a lookup made it."""
        trace = _TRACE.get()
        return [why for value, node in zip(values, nodes, strict=True)
                if value is None and (why := trace.why(node)) is not None]


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str):  # '%d' % x formats text, and '%999999999d' makes a gigabyte
        raise Refused("'%' is the remainder of numbers, not string formatting")
    return a % b


def _arithmetic(compute: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def limited(a: Any, b: Any) -> Any:
        return checked(compute(checked(a), checked(b)))
    return limited


def _add(a: Any, b: Any) -> Any:
    # a `pluck` or a map's output on disk joins a list as a list
    if is_list(a) and is_list(b) and not (isinstance(a, list) and isinstance(b, list)):
        if len(a) + len(b) > simpleeval.MAX_STRING_LENGTH:
            raise IterableTooLong("the joined list would be too long")
        return list(a) + list(b)
    return simpleeval.safe_add(a, b)


_OPERATORS = {
    ast.Add: _arithmetic(_add),
    ast.Sub: _arithmetic(operator.sub),
    ast.Mult: _arithmetic(simpleeval.safe_mult), ast.Div: _arithmetic(operator.truediv),
    ast.FloorDiv: _arithmetic(operator.floordiv), ast.Mod: _arithmetic(_mod),
    ast.USub: lambda a: checked(-a), ast.Not: operator.not_,
    **{op: simpleeval.DEFAULT_OPERATORS[op] for op in _COMPARISONS},
}


def _reason(exc: Exception) -> str:
    if isinstance(exc, IterableTooLong):
        return f"the result would be longer than {simpleeval.MAX_STRING_LENGTH} characters"
    if isinstance(exc, NullUsed) and exc.why:
        return f"{exc}: {'; '.join(dict.fromkeys(exc.why))}"
    return str(exc) or type(exc).__name__


_EVALUATOR = _Evaluator()
