"""Search strategies: ask/tell objects that propose genomes and learn from results.

Every strategy is registered by name in :data:`STRATEGIES` and built with :func:`make_strategy`:

    strategy = make_strategy("nsga2", space=space, objectives=[("val_accuracy", "max"), ...],
                             population=16, generations=6, seed=0)
    while not strategy.done:
        genomes = strategy.ask()
        strategy.tell([Told(genome=g, values=evaluate(g), status="complete") for g in genomes])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from petra.engine.strategies import (  # noqa: F401  (fill the registry)
    grid,
    level_switch,
    nsga2,
    nsga3,
    optuna_search,
    random_search,
)
from petra.engine.strategies.base import STRATEGIES, Strategy, Told, candidate_seed
from petra.space import SearchSpace


def make_strategy(
    name: str,
    *,
    space: SearchSpace,
    objectives: Sequence[tuple[str, str]],
    population: int,
    generations: int,
    seed: int,
    initial: Iterable[Mapping[str, Any]] = (),
    offspring: int | None = None,
) -> Strategy:
    """Build the strategy registered as ``name``.

    Args:
        name: a name in :data:`STRATEGIES`; an unknown one raises ``ValueError`` listing them.
        space: the genes to search.
        objectives: ``(metric, direction)`` pairs, direction "max" or "min", in the order of
            :attr:`Told.values`.
        population: genomes per batch.
        generations: how many batches are told before the strategy is ``done``.
        seed: the search's seed; the same seed gives the same proposals.
        initial: genomes (possibly partial) that take the place of random ones in the first
            batch; at most ``population`` of them are used.
        offspring: the size of every batch after the first (default ``population``); racing
            asks for more than it measures (:mod:`petra.engine.racing`).
    """
    return STRATEGIES.get(name).fn(space=space, objectives=objectives, population=population,
                                   generations=generations, seed=seed, initial=initial,
                                   offspring=offspring)


__all__ = ["STRATEGIES", "Strategy", "Told", "candidate_seed", "make_strategy"]
