"""The optimiser of the coach example: a small genetic algorithm minimising Rastrigin.

The state is a plain, picklable dict. Public fields (no leading underscore) are the ones a coach
may tune; the private ones, including the random generator, make the run reproducible and
resumable from a pickled checkpoint.
"""

from __future__ import annotations

import math
import random
import re
import statistics

LOW, HIGH = -5.12, 5.12
CROSSOVERS = ("uniform", "blend", "one_point")
BOUNDS = {"mutation_rate": (0.001, 0.5), "sigma": (0.01, 2.0)}
TOURNAMENT = 3


def rastrigin(x: list[float]) -> float:
    """Rastrigin's function: 0 at the origin, a grid of local minima elsewhere."""
    return 10 * len(x) + sum(v * v - 10 * math.cos(2 * math.pi * v) for v in x)


def _random_individual(rng: random.Random, dimensions: int) -> list[float]:
    return [rng.uniform(LOW, HIGH) for _ in range(dimensions)]


def init(seed: int = 7, dimensions: int = 8, population: int = 30) -> dict:
    """A fresh state: a random population and the default settings."""
    rng = random.Random(seed)
    pop = [_random_individual(rng, dimensions) for _ in range(population)]
    fitness = [rastrigin(x) for x in pop]
    best = min(range(population), key=fitness.__getitem__)
    return {"mutation_rate": 0.05, "sigma": 0.3, "crossover": "uniform", "population": population,
            "dimensions": dimensions, "best": fitness[best], "best_x": [round(v, 4) for v in pop[best]],
            "_rng": rng, "_pop": pop, "_fitness": fitness, "_stagnant": 0, "_generation": 0}


def _resize(state: dict) -> None:
    """Follow a changed `population`: keep the fittest when shrinking, add random ones when growing."""
    pop, fitness = state["_pop"], state["_fitness"]
    size = state["population"] = max(2, int(state["population"]))
    if size < len(pop):
        keep = sorted(range(len(pop)), key=fitness.__getitem__)[:size]
        state["_pop"], state["_fitness"] = [pop[i] for i in keep], [fitness[i] for i in keep]
    while len(state["_pop"]) < size:
        x = _random_individual(state["_rng"], state["dimensions"])
        state["_pop"].append(x)
        state["_fitness"].append(rastrigin(x))


def _select(rng: random.Random, fitness: list[float]) -> int:
    return min((rng.randrange(len(fitness)) for _ in range(TOURNAMENT)), key=fitness.__getitem__)


def _cross(rng: random.Random, kind: str, a: list[float], b: list[float]) -> list[float]:
    if kind == "uniform":
        return [u if rng.random() < 0.5 else v for u, v in zip(a, b, strict=True)]
    if kind == "blend":  # BLX-0.5: anywhere in the parents' span, widened by half of it each side
        return [rng.uniform(min(u, v) - abs(u - v) / 2, max(u, v) + abs(u - v) / 2)
                for u, v in zip(a, b, strict=True)]
    if kind == "one_point":
        cut = rng.randrange(1, len(a)) if len(a) > 1 else 0
        return a[:cut] + b[cut:]
    raise ValueError(f"unknown crossover {kind!r}: use one of {', '.join(CROSSOVERS)}")


def one_generation(state: dict, generation: int) -> dict:
    """Advance the state by one generation in place; return that generation's statistics."""
    if state["population"] != len(state["_pop"]):
        _resize(state)
    rng, pop, fitness = state["_rng"], state["_pop"], state["_fitness"]
    rate, sigma, kind = state["mutation_rate"], state["sigma"], state["crossover"]
    elite = min(range(len(pop)), key=fitness.__getitem__)
    children = [pop[elite]]
    while len(children) < len(pop):
        child = _cross(rng, kind, pop[_select(rng, fitness)], pop[_select(rng, fitness)])
        for i, v in enumerate(child):
            if rng.random() < rate:
                v += rng.gauss(0.0, sigma)
            child[i] = min(HIGH, max(LOW, v))
        children.append(child)
    fitness = [fitness[elite]] + [rastrigin(x) for x in children[1:]]
    state["_pop"], state["_fitness"], state["_generation"] = children, fitness, generation
    best = min(range(len(children)), key=fitness.__getitem__)
    if fitness[best] < state["best"]:
        state["best"], state["best_x"] = fitness[best], [round(v, 4) for v in children[best]]
        state["_stagnant"] = 0
    else:
        state["_stagnant"] += 1
    diversity = statistics.fmean(statistics.pstdev(gene) for gene in zip(*children, strict=True))
    return {"best": round(fitness[best], 6), "mean": round(statistics.fmean(fitness), 6),
            "diversity": round(diversity, 6), "stagnant": state["_stagnant"]}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def apply_advice(state: dict, advice: dict) -> dict:
    """Apply a coach's advice: numbers clamped to sane bounds, unknown or ill-typed values ignored."""
    advice = advice or {}
    for key, (low, high) in BOUNDS.items():
        value = _number(advice.get(key))
        if value is not None:
            state[key] = min(high, max(low, value))
    crossover = advice.get("crossover")
    if isinstance(crossover, str) and crossover.strip().lower() in CROSSOVERS:
        state["crossover"] = crossover.strip().lower()
    return state


def _last(name: str, text: str) -> float | None:
    found = re.findall(rf'"{name}":\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)', text)
    return float(found[-1]) if found else None


def heuristic_advice(request: dict) -> dict:
    """Advice without a model, from the last diversity and stagnation reported in the prompt."""
    text = request["messages"][-1]["content"]
    diversity, stagnant = _last("diversity", text), _last("stagnant", text)
    seen = f"diversity {diversity:g}" if diversity is not None else "diversity unknown"
    seen += f", stagnant {stagnant:g}" if stagnant is not None else ""
    if (diversity is not None and diversity < 0.3) or (stagnant is not None and stagnant >= 3):
        return {"mutation_rate": 0.2, "sigma": 0.8, "crossover": "blend",
                "reason": f"heuristic: {seen}: explore more"}
    if diversity is not None and diversity > 1.5:
        return {"mutation_rate": 0.02, "sigma": 0.1, "crossover": "uniform",
                "reason": f"heuristic: {seen}: refine around the best"}
    return {"mutation_rate": 0.05, "sigma": 0.3, "crossover": "uniform",
            "reason": f"heuristic: {seen}: keep moderate settings"}


def scripted_advice(generation: int) -> dict:
    """Deterministic advice for tests, deliberately malformed at generation 10."""
    if generation == 5:
        return {"mutation_rate": 0.2, "sigma": 0.6, "crossover": "BLEND"}
    if generation == 10:
        return {"mutation_rate": 7.5, "sigma": "wide", "crossover": "zigzag"}
    return {"mutation_rate": 0.05, "sigma": 0.3, "crossover": "Uniform"}


def summary(loop: dict) -> dict:
    """What the run found, and how often the coach's advice was applied."""
    applied = [a["applied_at"] for a in loop["analyses"] if a.get("applied_at")]
    return {"best": loop["state"]["best"], "best_x": loop["state"]["best_x"],
            "generations": loop["generations"], "stopped": loop["stopped"], "advice_applied_at": applied}
