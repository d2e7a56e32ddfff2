"""Random search: each generation is ``population`` new genomes drawn uniformly from the space."""

from __future__ import annotations

from petra.engine.strategies.base import STRATEGIES, StrategyBase


@STRATEGIES.register("random", description="uniform random genomes, never repeating a recipe",
                     baseline=True)
class RandomSearch(StrategyBase):
    """Proposes ``population`` unique random genomes per generation, for ``generations`` tells.

    The first batch starts with the ``initial`` genomes. Results are ignored apart from
    counting generations; a genome's hash is never proposed twice while the space allows it.
    This is :class:`~petra.engine.strategies.base.StrategyBase`'s default behaviour, registered.
    """

    name = "random"
