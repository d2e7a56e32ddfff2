"""NSGA-III in ask/tell form: NSGA-II's variation with reference-point environmental selection.

Everything but survival is :class:`~petra.engine.strategies.nsga2.NSGA2`'s: the same genome encoding,
SBX and polynomial mutation, categorical swap and reset, deduplication and failure handling.
Survivors are chosen by ``deap.tools.selNSGA3`` against Das and Dennis reference points from
``deap.tools.uniform_reference_points``, which keeps a spread front with three or more
objectives, where crowding distance loses its grip.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from deap import tools as deap_tools

from petra.engine.strategies.base import STRATEGIES
from petra.engine.strategies.nsga2 import NSGA2
from petra.engine.strategies.operators import (
    Individual,
    binary_tournament,
    seeded_numpy,
    seeded_random,
)

#: The third entry of the seed of a generation's selection (variation uses small call counts).
_SELECT_STREAM = 2**31


def reference_divisions(n_objectives: int, population: int) -> int:
    """The largest ``p`` whose ``C(n + p - 1, p)`` reference points are at most ``population``.

    At least 1, so a population smaller than the number of objectives still gets the corners.
    """
    if n_objectives < 2:
        return 1
    p = 1
    while math.comb(n_objectives + p, p + 1) <= population:
        p += 1
    return p


@STRATEGIES.register(
    "nsga3", description="NSGA-III (DEAP): NSGA-II's variation, reference-point selection"
)
class NSGA3(NSGA2):
    """NSGA-III over a :class:`~petra.space.SearchSpace`, in ask/tell form.

    Generation 0 and the offspring are made as in :class:`~petra.engine.strategies.nsga2.NSGA2`,
    except that the binary tournament compares non-dominated rank only (ties by a coin), as
    crowding distance plays no part in NSGA-III. After each :meth:`tell`, the population is
    ``selNSGA3(parents + offspring, population, ref_points)``, with about ``population``
    reference points. Failed results (scored ``FAILED_MAGNITUDE``) are kept out of the
    normalisation and survive only when too few results succeeded.
    """

    name = "nsga3"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = len(self.objectives)
        self.ref_points = deap_tools.uniform_reference_points(
            n, reference_divisions(n, self.population)
        )

    def _select(self, individuals: list[Individual], k: int) -> list[Individual]:
        ok = [ind for ind in individuals if ind.fitness.values != self._worst]
        failed = [ind for ind in individuals if ind.fitness.values == self._worst]
        if len(ok) <= k:
            return ok + failed[: k - len(ok)]
        # selNSGA3's niching shuffles with numpy's global generator: seed it from
        # (seed, generation), and restore it (and the global random) afterwards.
        seed = int(
            np.random.SeedSequence([self.seed, self._generation, _SELECT_STREAM]).generate_state(1)[
                0
            ]
        )
        with seeded_random(seed), seeded_numpy(seed):
            return deap_tools.selNSGA3(ok, k, self.ref_points)

    def _tournament(self) -> Individual:
        """Binary tournament: lower rank wins, then a coin."""
        return binary_tournament(self._population, self._rng, crowding=False)
