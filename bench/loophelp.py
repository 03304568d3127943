"""Loop bodies for bench/loop.py: the loop step calls them, and so does the plain `for` loop it is
measured against (the same module object, so both run exactly the same code on the same state).

The specs name these functions `loophelp:NAME`; bench/loop.py makes this folder importable.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

GA_FILE = Path(__file__).resolve().parent.parent / "examples" / "coach" / "ga.py"


def _ga() -> ModuleType:
    """The coach example's genetic algorithm, loaded from its file (it is not an installed module)."""
    spec = importlib.util.spec_from_file_location("loophelp_coach_ga", GA_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ga = _ga()


def init_counter() -> dict:
    """The trivial body's state: a counter and a setting a coach may change."""
    return {"count": 0, "rate": 5}


def count(state: dict, generation: int) -> dict:
    """A generation that does nothing but count."""
    state["count"] += 1
    return {"count": state["count"]}


def init_ga(population: int = 70, seed: int = 7) -> dict:
    """The coach example's state, with a population big enough for ~1 ms per generation."""
    return ga.init(seed=seed, dimensions=8, population=population)


def ga_generation(state: dict, generation: int) -> dict:
    """One generation of the coach example's genetic algorithm."""
    return ga.one_generation(state, generation)


def init_sleepy(seconds: float = 0.1) -> dict:
    """A body that takes `seconds` per generation, and a setting a coach may change."""
    return {"seconds": seconds, "count": 0, "rate": 5}


def sleepy(state: dict, generation: int) -> dict:
    """A generation that takes `state['seconds']` of wall time (a stand-in for real work)."""
    time.sleep(state["seconds"])
    state["count"] += 1
    return {"count": state["count"], "rate": state["rate"]}
