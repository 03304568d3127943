"""A (mu, lambda) evolution strategy on the Rosenbrock function: the optimiser of
specs/evolution-coach.yaml. The coach tunes its step size `sigma`."""

import math
import random

MU, LAMBDA = 5, 20


def rosenbrock(x):
    return sum(100 * (b - a * a) ** 2 + (1 - a) ** 2 for a, b in zip(x, x[1:], strict=False))


def init(seed=7, dimensions=6):
    rng = random.Random(seed)
    parents = [[rng.uniform(-2, 2) for _ in range(dimensions)] for _ in range(MU)]
    return {"sigma": 0.5, "best": min(map(rosenbrock, parents)), "stagnant": 0,
            "_rng": rng, "_parents": parents}


def one_generation(state, generation):
    rng, parents, sigma = state["_rng"], state["_parents"], state["sigma"]
    children = [[g + rng.gauss(0, sigma) for g in rng.choice(parents)] for _ in range(LAMBDA)]
    children.sort(key=rosenbrock)
    state["_parents"] = children[:MU]
    best = rosenbrock(children[0])
    state["stagnant"] = 0 if best < state["best"] else state["stagnant"] + 1
    state["best"] = min(best, state["best"])
    columns = list(zip(*state["_parents"], strict=True))
    diversity = sum(math.sqrt(sum((v - sum(c) / MU) ** 2 for v in c) / MU) for c in columns) / len(columns)
    return {"best": round(state["best"], 6), "diversity": round(diversity, 6),
            "sigma": round(sigma, 6), "stagnant": state["stagnant"]}


def apply_advice(state, advice):
    """The coach says raise, lower or keep the mutation: sigma doubles or halves, within bounds."""
    factor = {"raise": 2.0, "lower": 0.5}.get(str(advice.get("mutation", "")).lower(), 1.0)
    state["sigma"] = min(max(state["sigma"] * factor, 1e-4), 2.0)
    return state
