"""`python`: call `module:function` with resolved arguments; its return value is the output."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LmflowError, Problem
from . import register
from .base import FUNCTION_PATTERN, CheckContext, Step, StepContext, StepResult

FUNCTION = FUNCTION_PATTERN


@contextmanager
def importable_from(folder: Path) -> Iterator[None]:
    """Let the spec's own folder hold the modules it names."""
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _module_file(module: str, spec_dir: Path) -> Path | None:
    with importable_from(spec_dir):
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
    return Path(found.origin) if found and found.origin and found.has_location else None


class UserCodeError(LmflowError):
    """The user's function raised; its message says where."""


class UserCodeFailed(UserCodeError):
    """The function itself raised: retried like any failure that may heal (a flaky call inside)."""

    retryable = True


@register
class PythonStep(Step):
    kind = "python"
    summary = "Call a Python function (module:function) with keyword arguments."
    options_schema = {
        "type": "object",
        "required": ["function"],
        "additionalProperties": False,
        "properties": {
            "function": {
                "type": "string",
                "pattern": f"^{FUNCTION}$",
                "description": "module:function; the spec's folder is importable.",
            },
            "args": {"type": "object", "description": "Keyword arguments; may use ${{ }} references."},
        },
    }

    def check(self, options: dict[str, Any], ctx: CheckContext) -> Iterator[Problem]:
        function = options.get("function")
        if not isinstance(function, str) or not re.fullmatch(FUNCTION, function):
            return  # the schema reports it
        missing = missing_module(function, ctx.spec_dir)
        if missing:
            yield ctx.problem(("function",), missing, "put it next to the spec or install it")

    def cache_material(self, options: dict[str, Any], spec_dir: Path) -> Any:
        # a changed function body is a changed step
        path = _module_file(options["function"].partition(":")[0], spec_dir)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        return StepResult(call_function(options["function"], options.get("args") or {}, ctx.spec_dir))


def missing_module(ref: str, spec_dir: Path) -> str | None:
    """Why `module:function` cannot be imported from the spec's folder (None when it can)."""
    top = ref.partition(":")[0].split(".")[0]
    with importable_from(spec_dir):
        found = importlib.util.find_spec(top)
    return None if found is not None else f"module '{top}' not found"


def load_function(ref: str, spec_dir: Path) -> Any:
    """The function `module:function` names, imported with the spec's folder importable."""
    module_name, _, name = ref.partition(":")
    with importable_from(spec_dir):
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # user code: report it, whatever it is
            raise UserCodeError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    top = module_name.split(".")[0]
    local = spec_dir / f"{top}.py"
    if (local.exists() or (spec_dir / top).is_dir()) and not str(
        getattr(module, "__file__", "") or ""
    ).startswith(str(spec_dir)):
        raise UserCodeError(
            f"module '{module_name}' resolved to {getattr(module, '__file__', 'a built-in')}, "
            f"not to {local}: its name is taken (standard library or installed); rename it")
    function = getattr(module, name, None)
    if not callable(function):
        raise UserCodeError(f"{module_name} has no function '{name}'")
    return function


def call_function(ref: str, kwargs: dict[str, Any], spec_dir: Path) -> Any:
    """Call user code; whatever it raises becomes a UserCodeError that says where."""
    function = load_function(ref, spec_dir)
    try:
        return function(**kwargs)
    except Exception as exc:  # user code: report it with its location
        tb = exc.__traceback__
        where = ""
        while tb is not None:
            where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
            tb = tb.tb_next
        raise UserCodeFailed(f"{ref} raised {type(exc).__name__}: {exc}{where}") from exc
