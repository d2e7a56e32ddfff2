"""The evolutionary operators the DEAP strategies share, as small functions (as DEAP's own
``tools`` are): seeded access to the global generators DEAP draws from, bounded SBX, polynomial
mutation, and the binary tournament.

DEAP's mutation draws from the global :mod:`random` module, and ``selNSGA3``'s niching from
numpy's global generator. Every such call runs inside :func:`seeded_random` (and
:func:`seeded_numpy`), which seed them from the caller's ``(seed, generation, call)`` and
restore the previous global state afterwards: the search is reproducible and nobody else's
``random`` moves.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from deap import base as deap_base
from deap import tools as deap_tools

#: Probability that a pair of parents is crossed (otherwise the children copy them).
CROSSOVER_PROB = 0.9
#: Per-gene probability that a categorical gene is swapped during crossover.
SWAP_PROB = 0.5
#: Per-variable probability that SBX crosses a real gene (DEAP's and Deb's 0.5).
SBX_PROB_VAR = 0.5
#: Whether SBX exchanges a crossed variable's two children at random, as DEAP does (see
#: :func:`sbx_bounded`; off by default).
SBX_EXCHANGE = False
#: Distribution indices of SBX and polynomial mutation.
ETA_CROSSOVER = 20.0
ETA_MUTATION = 20.0
#: A failed (or non-finite) result scores this badly in every objective: finite, so that
#: crowding distances stay finite, and far beyond any real metric.
FAILED_MAGNITUDE = 1e18


@contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    """Seed the global ``random`` for one DEAP call, then restore its previous state."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def sbx_bounded(
    x1: list[float], x2: list[float], *, eta: float, low: Sequence[float],
    up: Sequence[float], rng: np.random.Generator, prob_var: float = SBX_PROB_VAR,
    exchange: bool | None = None,
) -> None:
    """Bounded simulated binary crossover (Deb and Agrawal), in place, from ``rng``.

    DEAP's ``cxSimulatedBinaryBounded`` with one change: the two children of a crossed
    variable are not exchanged at random. The first child takes the lower spread value of every
    crossed variable and the second the upper one, so the pair spreads along the diagonal
    through its parents, towards the corners of the box. Compression fronts often lie at the
    bounds (no sparsity, or the most). Measured on ZDT1, whose optimum is at the lower bound:
    hypervolume 120.655 against 120.433 with the exchange (5 seeds). On a ZDT1 shifted so the
    optimum is inside the box, 120.416 against 120.405, within the seeds' spread
    (``benchmarks/zdt1.py`` measures both, with and without the exchange).

    Args:
        exchange: swap each crossed variable's children with probability 0.5, as DEAP does;
            None reads :data:`SBX_EXCHANGE`.
    """
    exchange = SBX_EXCHANGE if exchange is None else exchange
    for i, (xl, xu) in enumerate(zip(low, up, strict=True)):
        if rng.random() > prob_var or abs(x1[i] - x2[i]) <= 1e-14:
            continue
        lo, hi = min(x1[i], x2[i]), max(x1[i], x2[i])
        u = rng.random()
        c1 = 0.5 * (lo + hi - _sbx_spread(1.0 + 2.0 * (lo - xl) / (hi - lo), u, eta) * (hi - lo))
        c2 = 0.5 * (lo + hi + _sbx_spread(1.0 + 2.0 * (xu - hi) / (hi - lo), u, eta) * (hi - lo))
        c1, c2 = min(max(c1, xl), xu), min(max(c2, xl), xu)
        if exchange and rng.random() < 0.5:
            c1, c2 = c2, c1
        x1[i], x2[i] = c1, c2


def _sbx_spread(beta: float, u: float, eta: float) -> float:
    """SBX's spread factor for uniform draw ``u``, its distribution cut off at the bound."""
    alpha = 2.0 - beta ** -(eta + 1)
    if u <= 1.0 / alpha:
        return (u * alpha) ** (1.0 / (eta + 1))
    return (1.0 / (2.0 - u * alpha)) ** (1.0 / (eta + 1))


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Seed numpy's global generator for one DEAP call, then restore its previous state."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def polynomial_mutation(x: list[float], *, low: Sequence[float], up: Sequence[float],
                        indpb: float, seed: int, eta: float = ETA_MUTATION) -> None:
    """DEAP's bounded polynomial mutation of ``x`` in place, each variable with probability
    ``indpb``, drawn from ``random`` seeded with ``seed``."""
    with seeded_random(seed):
        deap_tools.mutPolynomialBounded(x, eta=eta, indpb=indpb, low=list(low), up=list(up))


class Individual(list):
    """Gene values in the space's order, with a DEAP fitness, a rank and a crowding distance."""

    def __init__(self, values: Iterable[Any], fitness: deap_base.Fitness) -> None:
        super().__init__(values)
        self.fitness = fitness
        self.rank = 0



def binary_tournament(population: Sequence[Individual], rng: np.random.Generator, *,
                      crowding: bool = True) -> Individual:
    """Two members drawn at random: the lower non-dominated rank wins, then (with
    ``crowding``, NSGA-II) the larger crowding distance, then a coin (NSGA-III: rank, coin)."""
    i, j = rng.integers(len(population), size=2)
    a, b = population[int(i)], population[int(j)]
    if a.rank != b.rank:
        return a if a.rank < b.rank else b
    if crowding:
        da, db = a.fitness.crowding_dist, b.fitness.crowding_dist
        if da != db:
            return a if da > db else b
    return a if rng.random() < 0.5 else b


def level_switch(values: list[float], weights: Sequence[float], low: Sequence[float],
                 high: Sequence[float], rng: np.random.Generator, *, step: float = 0.05
                 ) -> bool:
    """EvoPress's budget-preserving mutation, in place: raise one level by up to ``step`` and
    lower another so that ``sum(weights * values)`` (the parameters removed) is unchanged.

    ``values`` are the sparsities of the layers that are pruned, ``weights`` their parameter
    counts. Returns False (nothing changed) when no pair can move."""
    up = [i for i in range(len(values)) if values[i] < high[i]]
    if len(values) < 2 or not up:
        return False
    i = int(up[int(rng.integers(len(up)))])
    down = [j for j in range(len(values)) if j != i and values[j] > low[j]]
    if not down:
        return False
    j = int(down[int(rng.integers(len(down)))])
    raise_i = min(step * float(rng.uniform(0.2, 1.0)), high[i] - values[i])
    lower_j = raise_i * weights[i] / weights[j]
    if values[j] - lower_j < low[j]:
        lower_j = values[j] - low[j]
        raise_i = lower_j * weights[j] / weights[i]
    values[i] += raise_i
    values[j] -= lower_j
    return True
