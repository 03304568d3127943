"""lmflow's home directory: engine logs, run records, the managed Prefect server."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """`$LMFLOW_HOME`, else `~/.lmflow`; created on first use."""
    path = home_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def home_path() -> Path:
    """Where the home is, whether or not it exists (made by `home()`)."""
    return Path(os.environ.get("LMFLOW_HOME") or Path.home() / ".lmflow").expanduser()


def subdir(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared() -> Path | None:
    """`$LMFLOW_SHARED`: the folder every machine of a distributed map reaches (each with its own
    mount of it), where the map's items, answers and step cache travel; None when unset."""
    value = os.environ.get("LMFLOW_SHARED")
    return Path(value).expanduser() if value else None
