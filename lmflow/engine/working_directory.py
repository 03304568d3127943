"""The process-wide working directory of runs: the spec's folder while any run goes on."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_CWD_LOCK = threading.Lock()
_CWD: dict[str, Any] = {"folder": None, "runs": 0, "before": None}


@contextmanager
def working_directory(folder: Path, warn: Callable[[str], None]) -> Iterator[None]:
    """Run in the spec's folder, the one rule for every relative path a spec or its code uses.

    `{file:}` values, datasets and models' paths are resolved against the spec's folder;
    user code (`python:` steps, loop bodies, fallbacks) opens files relative to the
    working directory, which is process-wide: the first run in a process moves there and
    the last one back. Runs of specs in other folders at the same time in one process
    cannot both have theirs; the later one says so and keeps the first's.
    """
    folder = folder.resolve()
    with _CWD_LOCK:
        if _CWD["runs"] == 0:
            _CWD.update(folder=folder, before=os.getcwd())
            os.chdir(folder)
        elif _CWD["folder"] != folder:
            warn(f"another run in this process works in {_CWD['folder']}: relative paths in this "
                 f"run's Python code resolve there, not in {folder}")
        _CWD["runs"] += 1
    try:
        yield
    finally:
        with _CWD_LOCK:
            _CWD["runs"] -= 1
            if _CWD["runs"] == 0:
                try:
                    os.chdir(_CWD["before"])
                except OSError:
                    pass  # the folder we came from is gone: stay where we are
                _CWD.update(folder=None, before=None)
