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
from .base import CheckContext, Step, StepContext, StepResult

FUNCTION = r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*"


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
        top = function.partition(":")[0].split(".")[0]
        with importable_from(ctx.spec_dir):
            found = importlib.util.find_spec(top)
        if found is None:
            yield ctx.problem(("function",), f"module '{top}' not found",
                              "put it next to the spec or install it")

    def cache_material(self, options: dict[str, Any], spec_dir: Path) -> Any:
        # a changed function body is a changed step
        path = _module_file(options["function"].partition(":")[0], spec_dir)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        module_name, _, name = options["function"].partition(":")
        with importable_from(ctx.spec_dir):
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # user code: report it, whatever it is
                raise UserCodeError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
        top = module_name.split(".")[0]
        local = ctx.spec_dir / f"{top}.py"
        if (local.exists() or (ctx.spec_dir / top).is_dir()) and not str(
            getattr(module, "__file__", "") or ""
        ).startswith(str(ctx.spec_dir)):
            raise UserCodeError(
                f"module '{module_name}' resolved to {getattr(module, '__file__', 'a built-in')}, "
                f"not to {local}: its name is taken (standard library or installed); rename it")
        function = getattr(module, name, None)
        if not callable(function):
            raise UserCodeError(f"{module_name} has no function '{name}'")
        try:
            value = function(**(options.get("args") or {}))
        except Exception as exc:  # user code: report it with its location
            tb = exc.__traceback__
            where = ""
            while tb is not None:
                where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
                tb = tb.tb_next
            raise UserCodeError(f"{options['function']} raised {type(exc).__name__}: {exc}{where}") from exc
        return StepResult(value)
