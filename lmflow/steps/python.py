"""`python`: call `module:function` with resolved arguments; its return value is the output.

Steps run in worker threads. `sys.path` and the import system are process-wide, so
every lookup or import that puts a spec's folder on `sys.path` holds one process-wide
lock (`_IMPORTS`) for as long as the folder is there; the user's function is then
called outside it. With a timeout, the function runs in another thread (a daemon thread,
kept for later calls) that the caller stops waiting for: Python cannot kill a thread, so
a function past its time is left running in the background (and whatever it raises later
is dropped).
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib
import importlib.util
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import (  # the UserCode errors: raised here, defined with the tree
    Problem,
    UserCodeCancelled,
    UserCodeError,
    UserCodeFailed,
    UserCodeTimeout,
)
from . import register
from .base import FUNCTION_PATTERN, CheckContext, Step, StepContext, StepResult

FUNCTION = FUNCTION_PATTERN


# Reentrant: a spec module that, while it is imported, imports another through lmflow.
# Held through the import itself, so a module that runs for long at import time
# delays the other steps' imports (never their calls).
_IMPORTS = threading.RLock()


@contextmanager
def importable_from(folder: Path) -> Iterator[None]:
    """Let the spec's own folder hold the modules it names (one thread at a time: see above)."""
    entry = str(folder)
    with _IMPORTS:
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
        problem = function_problem(function, ctx.spec_dir)
        if problem:
            yield ctx.problem(("function",), *problem)

    def cache_material(self, options: dict[str, Any], spec_dir: Path) -> Any:
        return source_hash(options["function"], spec_dir)  # a changed function body is a changed step

    def run(self, options: dict[str, Any], ctx: StepContext) -> StepResult:
        return StepResult(call_function(options["function"], options.get("args") or {}, ctx.spec_dir,
                                        timeout=ctx.timeout, cancel=ctx.stopping))


def source_hash(ref: str, spec_dir: Path) -> str | None:
    """SHA-256 of the file of the module `module:function` names (None: not a file)."""
    path = _module_file(ref.partition(":")[0], spec_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None


#: top-level modules imported from a spec's folder, and that folder (under _IMPORTS)
_SPEC_MODULES: dict[str, Path] = {}


def _forget_other_specs_module(top: str, spec_dir: Path) -> None:
    """Two specs may each have a `helpers.py`: when another spec's module holds the name this spec
    imports, it (and its submodules) leave `sys.modules`, so this spec's own is imported. Functions
    already taken from the other keep working (they hold their module's globals)."""
    folder = _SPEC_MODULES.get(top)
    if folder is None or folder == spec_dir:
        return
    for loaded in [m for m in sys.modules if m == top or m.startswith(f"{top}.")]:
        sys.modules.pop(loaded, None)
    del _SPEC_MODULES[top]


def load_function(ref: str, spec_dir: Path) -> Any:
    """The function `module:function` names, imported with the spec's folder importable."""
    module_name, _, name = ref.partition(":")
    top = module_name.split(".")[0]
    with importable_from(spec_dir):
        _forget_other_specs_module(top, spec_dir)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # user code: report it, whatever it is
            raise UserCodeError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
        if _in_folder(sys.modules.get(top), spec_dir):
            _SPEC_MODULES[top] = spec_dir
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


#: False while a spec is checked without running any of its code (`lmflow validate --no-import`)
IMPORT_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("lmflow_import_code", default=True)


def function_problem(ref: str, spec_dir: Path) -> tuple[str, str | None] | None:
    """(message, hint) when `module:function` cannot be loaded from the spec's folder (None: it can).

    Validation loads it as a run does (`load_function`): the module is imported, so its top
    level runs, but the function is never called. The spec's own modules that this import
    added to `sys.modules` are dropped again, so the next import (a run in this process, or
    another spec with a `helpers.py` of its own) reads them from its folder afresh. With
    IMPORT_CODE false, the module's source is read instead (`static_function_problem`).
    """
    module_name, _, name = ref.partition(":")
    if not IMPORT_CODE.get():
        return static_function_problem(ref, spec_dir)
    with _IMPORTS:  # no other import from a spec's folder between the snapshot and the cleanup
        before = set(sys.modules)
        try:
            load_function(ref, spec_dir)
            return None
        except UserCodeError as exc:
            return _why_not_loaded(exc, module_name, name, spec_dir)
        finally:
            for added in set(sys.modules) - before:
                if _in_folder(sys.modules.get(added), spec_dir):
                    sys.modules.pop(added, None)


def static_function_problem(ref: str, spec_dir: Path) -> tuple[str, str | None] | None:
    """`function_problem` without running anything: the module's source file is found (next to the
    spec first, as a run finds it, else installed) and parsed, and the function must be a name its
    top level defines. A compiled or built-in module cannot be read: it passes."""
    import ast

    from ..spec.hints import suggest

    module_name, _, name = ref.partition(":")
    path = _source_file(module_name.split("."), spec_dir)
    if path is None:
        return f"module '{module_name}' not found", "put it next to the spec or install it"
    if path.suffix != ".py":
        return None
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read module '{module_name}' ({path}): {exc}", "fix the module"
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
    if name in defined or "*" in defined:
        return None
    return (f"module '{module_name}' ({path}) has no function '{name}'",
            suggest(name, sorted(n for n in defined if not n.startswith("_"))))


def _source_file(parts: list[str], spec_dir: Path) -> Path | None:
    """The file a module's code is in, found without importing anything (for a dotted name, its
    parent packages are not imported either)."""
    def within(folders: Any, rest: list[str]) -> Path | None:
        for folder in folders:
            base = Path(folder).joinpath(*rest)
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
        return None

    local = within([spec_dir], parts)
    if local is not None:
        return local
    try:
        found = importlib.util.find_spec(parts[0])  # a top-level name: found, not imported
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if len(parts) == 1:
        return Path(found.origin) if found.origin and found.has_location else Path("<built-in>")
    return within(found.submodule_search_locations or (), parts[1:])


def _why_not_loaded(exc: UserCodeError, module_name: str, name: str,
                    spec_dir: Path) -> tuple[str, str | None]:
    from ..spec.hints import nearest, suggest

    cause = exc.__cause__
    top = module_name.split(".")[0]
    if isinstance(cause, ModuleNotFoundError) and cause.name and module_name.startswith(cause.name) \
            and module_name[len(cause.name):][:1] in ("", "."):  # the module named, not one it imports
        local = [p.stem for p in spec_dir.glob("*.py")] + [p.name for p in spec_dir.iterdir()
                                                           if (p / "__init__.py").is_file()]
        close = nearest(top, local) if cause.name == top else None
        return (f"module '{cause.name}' not found",
                f"did you mean '{close}'?" if close else "put it next to the spec or install it")
    if isinstance(cause, ModuleNotFoundError):
        return (f"importing {module_name} raised ModuleNotFoundError: {cause}",
                f"install '{cause.name}' where lmflow runs" if cause.name else "install what it imports")
    if cause is not None:
        return (f"importing {module_name} raised {type(cause).__name__}: {cause}{_where(cause, spec_dir)}",
                "validation imports the module and calls nothing: fix what its top level runs")
    module = sys.modules.get(module_name)
    attribute = getattr(module, name, None)
    ours = _in_folder(module, spec_dir)
    shadowed = not ours and ((spec_dir / f"{top}.py").exists() or (spec_dir / top).is_dir())
    if module is None or callable(attribute) or shadowed:
        return str(exc), None  # the module was refused as a whole (its name is taken): it says why
    source = "" if ours else f" ({getattr(module, '__file__', None) or 'built-in'})"
    if hasattr(module, name):
        return (f"'{name}' in module '{module_name}'{source} is not a function: it is of type "
                f"{type(attribute).__name__}", "name a function (def) or another callable")
    functions = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                 and getattr(v, "__module__", None) == module.__name__]
    return (f"module '{module_name}'{source} has no function '{name}'",
            suggest(name, functions) or "it defines no functions")


def _in_folder(module: Any, folder: Path) -> bool:
    """Whether `module` was imported from `folder` (e.g. `folder/helpers.py`, `folder/pkg/...`)."""
    top = str(getattr(module, "__name__", "")).split(".")[0]
    places = [getattr(module, "__file__", None), *(getattr(module, "__path__", None) or [])]
    for place in filter(None, places):
        try:
            first = Path(place).relative_to(folder).parts[0]
        except (ValueError, IndexError, TypeError):
            continue
        if top and (first == top or first.startswith(top + ".")):
            return True
    return False


def _where(exc: BaseException, folder: Path) -> str:
    """` at file:line` of the innermost frame in the spec's folder (a SyntaxError says it itself)."""
    tb, where = exc.__traceback__, ""
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).is_relative_to(folder):
            where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def call_function(ref: str, kwargs: dict[str, Any], spec_dir: Path, timeout: float | None = None,
                  cancel: threading.Event | None = None) -> Any:
    """Call user code, waiting at most `timeout` seconds (None: as long as it takes) and no longer
    than until `cancel` is set; whatever it raises becomes a UserCodeError that says where."""
    return call(ref, load_function(ref, spec_dir), kwargs, timeout, cancel)


def call(ref: str, function: Any, kwargs: dict[str, Any], timeout: float | None = None,
         cancel: threading.Event | None = None) -> Any:
    """`call_function` for a function already loaded (a loop calls its body every generation)."""
    if timeout is None and cancel is None:
        try:
            return function(**kwargs)
        except Exception as exc:  # user code: report it with its location
            raise _failed(ref, exc) from exc
    return _call_with_timeout(ref, function, kwargs, timeout, cancel)


class _UserThreads:
    """Daemon threads that run user code under a timeout, kept for the next call.

    Starting a thread per call cost about 1 ms an item in a busy 1,000-item map
    (`Thread.start` waits for the new thread to get the GIL while Prefect's threads hold it).
    A thread whose call hangs stays with it (daemon: it does not hold up the interpreter's
    exit) and the next call gets another; a thread left idle for `idle` seconds ends. Not
    ThreadPoolExecutor: its threads are joined at exit, so one hung function would keep the
    process alive.
    """

    def __init__(self, idle: float = 30.0):
        self.idle = idle
        self._lock = threading.Lock()
        self._waiting: list[queue.SimpleQueue[Any]] = []  # the inboxes of idle threads

    def run(self, job: Any, name: str) -> None:
        """Run `job()` (which must not raise) in an idle thread, or a new one, named `name`."""
        with self._lock:
            inbox = self._waiting.pop() if self._waiting else None  # the last to finish: still warm
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name=name, daemon=True).start()
        inbox.put((job, name))

    def _serve(self, inbox: queue.SimpleQueue[Any]) -> None:
        while True:
            try:
                job, name = inbox.get(timeout=self.idle)
            except queue.Empty:
                with self._lock:
                    if inbox in self._waiting:
                        self._waiting.remove(inbox)
                        return
                continue  # a caller took this inbox just now: its job is on the way
            me = threading.current_thread()
            me.name = name
            job()
            del job  # its arguments and answer are not kept alive while the thread waits
            me.name = "lmflow python (idle)"
            with self._lock:
                self._waiting.append(inbox)


_USER_THREADS = _UserThreads()


def _finished_in_time(done: threading.Event, timeout: float | None, cancel: threading.Event | None) -> bool:
    """Wait for `done`; False after `timeout`; raises when the run is being stopped."""
    if cancel is None:
        return done.wait(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done.wait(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))):
        if cancel.is_set():
            raise UserCodeCancelled("the run was stopped while the function ran; it was left running "
                                    "in the background")
        if deadline is not None and time.monotonic() >= deadline:
            return False
    return True


def _call_with_timeout(ref: str, function: Any, kwargs: dict[str, Any], timeout: float | None,
                       cancel: threading.Event | None = None) -> Any:
    # The caller's context goes along (Prefect's run context lives in contextvars: a function
    # that calls get_run_logger() must still find its task run).
    context = contextvars.copy_context()
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = context.run(function, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it once
            outcome["error"] = exc
        finally:
            done.set()

    _USER_THREADS.run(run, f"lmflow python {ref}")
    if not _finished_in_time(done, timeout, cancel):
        raise UserCodeTimeout(
            f"{ref} did not return within {timeout:g}s: raise the step's `timeout:` if it needs "
            "longer; it was left running in the background (Python cannot kill a thread)")
    error = outcome.pop("error", None)
    if error is None:
        return outcome["value"]
    try:
        if isinstance(error, Exception):
            raise _failed(ref, error) from error
        raise error  # SystemExit, KeyboardInterrupt: as if the function ran here
    finally:
        del error  # the traceback holds the worker's frames


def _failed(ref: str, exc: Exception) -> UserCodeFailed:
    """`exc` as a UserCodeFailed naming the innermost file:line it came from."""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return UserCodeFailed(f"{ref} raised {type(exc).__name__}: {exc}{where}")
