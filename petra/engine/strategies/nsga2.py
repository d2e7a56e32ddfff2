"""NSGA-II in ask/tell form, built on DEAP's operators (and on nothing else of DEAP).

DEAP stays inside the strategies: they receive and return plain genome dicts. Individuals are a
small ``list`` subclass (gene values in the space's order) with a per-instance ``Fitness`` type,
so ``deap.creator`` and its module globals are never touched. Selection is DEAP's ``selNSGA2``;
the shared operators (:mod:`petra.engine.strategies.operators`) are DEAP's ``mutPolynomialBounded``,
:func:`~petra.engine.strategies.operators.sbx_bounded` (DEAP's bounded SBX without its per-variable
exchange of the children) and the binary tournament, each seeded from
``(seed, generation, call)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from deap import base as deap_base
from deap import tools as deap_tools
from deap.tools.emo import assignCrowdingDist

from petra.engine.pareto import non_dominated_ranks
from petra.engine.strategies.base import MAX_TRIES, STRATEGIES, StrategyBase, Told, first_batch
from petra.engine.strategies.operators import (
    CROSSOVER_PROB,
    ETA_CROSSOVER,
    FAILED_MAGNITUDE,
    SWAP_PROB,
    Individual,
    binary_tournament,
    polynomial_mutation,
    sbx_bounded,
)
from petra.errors import FAILED
from petra.space import Categorical, Float, Genome, Int


class _Numeric:
    """How a Float or Int gene maps to the real line that SBX and mutation work on."""

    def __init__(self, index: int, gene: Float | Int) -> None:
        self.index = index
        self.gene = gene
        self.log = isinstance(gene, Float) and gene.log
        if isinstance(gene, Int):
            # Widen by just under half a step so both end values are as likely as inner ones.
            self.low, self.high = gene.low - 0.499, gene.high + 0.499
        elif self.log:
            self.low, self.high = math.log(gene.low), math.log(gene.high)
        else:
            self.low, self.high = float(gene.low), float(gene.high)

    def encode(self, value: Any) -> float:
        return math.log(value) if self.log else float(value)

    def decode(self, x: float) -> Any:
        return self.gene.clip(math.exp(x) if self.log else x)


@STRATEGIES.register("nsga2", description="NSGA-II (DEAP operators): SBX, polynomial mutation")
class NSGA2(StrategyBase):
    """NSGA-II over a :class:`~petra.space.SearchSpace`, in ask/tell form.

    Generation 0 is the ``initial`` genomes, then random samples, up to ``population``. Each
    later generation picks parents by binary tournament on (rank, crowding distance) and varies
    them per gene type: categorical genes swap (crossover) and reset (mutation); Float and Int
    genes go through SBX and polynomial mutation within bounds (log genes in log space). A child
    whose hash was already proposed is mutated again, up to 20 times. After each :meth:`tell`,
    the population is ``selNSGA2(parents + offspring, population)``.

    Failed results, and results with non-finite values, score ``FAILED_MAGNITUDE`` in the worst
    direction of every objective. Pruned results with finite values count as measured.
    """

    name = "nsga2"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        weights = tuple(1.0 if d == "max" else -1.0 for _, d in self.objectives)
        self._fitness_type = type("Fitness", (deap_base.Fitness,), {"weights": weights})
        self._worst = tuple(-w * FAILED_MAGNITUDE for w in weights)
        self._numeric = [
            _Numeric(i, g)
            for i, g in enumerate(self.space.genes)
            if isinstance(g, (Float, Int)) and g.high > g.low
        ]
        self._categorical = [
            (i, g) for i, g in enumerate(self.space.genes) if isinstance(g, Categorical)
        ]
        self._indpb = 1.0 / max(len(self.space.genes), 1)
        self._population: list[Individual] = []
        self._calls = 0

    # -- hooks ----------------------------------------------------------------------------------

    def _propose(self) -> list[Genome]:
        if self._generation == 0 or not self._population:
            return first_batch(self.space, self._rng, self.population, self._initial,
                               self._seen)
        return self._offspring()

    def _learn(self, results: Sequence[Told]) -> None:
        told = []
        for r in results:
            genome = self.space.complete(r.genome)
            self._seen.add(self.space.genome_hash(genome))
            told.append(self._individual(genome, self._fitness_values(r)))
        self._population = self._select(self._population + told, self.population)
        self._assign_ranks()

    def _extra_state(self) -> dict[str, Any]:
        return {"population": [{"genome": self._genome(ind), "values": list(ind.fitness.values)}
                               for ind in self._population]}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._population = [
            self._individual(self.space.complete(p["genome"]), tuple(p["values"]))
            for p in state["population"]
        ]
        self._assign_ranks()

    # -- internals ------------------------------------------------------------------------------

    def _individual(self, genome: Mapping[str, Any], values: tuple[float, ...]) -> Individual:
        return Individual(
            (genome[g.name] for g in self.space.genes), self._fitness_type(tuple(values))
        )

    def _genome(self, values: Sequence[Any]) -> Genome:
        return {g.name: v for g, v in zip(self.space.genes, values, strict=True)}

    def _fitness_values(self, result: Told) -> tuple[float, ...]:
        if result.status == FAILED or result.values is None:
            return self._worst
        if len(result.values) != len(self.objectives):
            raise ValueError(
                f"a result has {len(result.values)} values for {len(self.objectives)} objectives"
            )
        values = tuple(float(v) for v in result.values)
        if not all(math.isfinite(v) for v in values):
            return self._worst
        return values

    def _select(self, individuals: list[Individual], k: int) -> list[Individual]:
        """Environmental selection: the ``k`` survivors of parents and offspring."""
        return deap_tools.selNSGA2(individuals, k)

    def _assign_ranks(self) -> None:
        """Rank and crowding distance of every member, for the tournament."""
        if not self._population:
            return
        ranks = non_dominated_ranks(-np.array([ind.fitness.wvalues for ind in self._population]))
        for rank in range(int(ranks.max()) + 1):
            front = [ind for ind, r in zip(self._population, ranks, strict=True) if r == rank]
            assignCrowdingDist(front)
            for ind in front:
                ind.rank = rank

    def _deap_seed(self) -> int:
        self._calls += 1
        return int(
            np.random.SeedSequence([self.seed, self._generation, self._calls]).generate_state(1)[0]
        )

    def _tournament(self) -> Individual:
        return binary_tournament(self._population, self._rng)

    def _crossover(self, c1: list[Any], c2: list[Any]) -> None:
        for i, _ in self._categorical:
            if self._rng.random() < SWAP_PROB:
                c1[i], c2[i] = c2[i], c1[i]
        if self._numeric:
            x1 = [n.encode(c1[n.index]) for n in self._numeric]
            x2 = [n.encode(c2[n.index]) for n in self._numeric]
            sbx_bounded(x1, x2, eta=ETA_CROSSOVER, low=[n.low for n in self._numeric],
                        up=[n.high for n in self._numeric], rng=self._rng)
            self._write_back(c1, x1)
            self._write_back(c2, x2)

    def _mutate(self, child: list[Any]) -> None:
        self._mutate_numeric(child, self._numeric)
        self._mutate_categorical(child)

    def _mutate_numeric(self, child: list[Any], numeric: Sequence[_Numeric]) -> None:
        """Polynomial mutation of the ``numeric`` genes of ``child``."""
        if numeric:
            x = [n.encode(child[n.index]) for n in numeric]
            polynomial_mutation(x, low=[n.low for n in numeric], up=[n.high for n in numeric],
                                indpb=self._indpb, seed=self._deap_seed())
            self._write_back(child, x, numeric)

    def _mutate_categorical(self, child: list[Any]) -> None:
        for i, gene in self._categorical:
            if self._rng.random() < self._indpb:
                child[i] = gene.sample(self._rng)

    def _write_back(self, child: list[Any], x: Sequence[float],
                    numeric: Sequence[_Numeric] | None = None) -> None:
        """Decode the numeric values that an operator changed back into ``child``."""
        for n, v in zip(self._numeric if numeric is None else numeric, x, strict=True):
            if v != n.encode(child[n.index]):
                child[n.index] = n.decode(v)

    def _offspring(self) -> list[Genome]:
        self._calls = 0
        batch: list[Genome] = []
        batch_hashes: set[str] = set()
        while len(batch) < self.offspring:
            c1, c2 = list(self._tournament()), list(self._tournament())
            if self._rng.random() < CROSSOVER_PROB:
                self._crossover(c1, c2)
            for child in (c1, c2):
                if len(batch) == self.offspring:
                    break
                self._mutate(child)
                h = self.space.genome_hash(self._genome(child))
                for _ in range(MAX_TRIES):
                    if h not in self._seen and h not in batch_hashes:
                        break
                    self._mutate(child)
                    h = self.space.genome_hash(self._genome(child))
                batch_hashes.add(h)
                batch.append(self._genome(child))
        self._seen |= batch_hashes
        return batch
