"""Random search: each generation is ``population`` new genomes drawn uniformly from the space."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from petra.space import Genome, SearchSpace
from petra.strategies.base import (
    STRATEGIES,
    StrategyBase,
    Told,
    check_state,
    first_batch,
    rng_from_state,
    rng_state,
    sample_unique,
)


@STRATEGIES.register("random", description="uniform random genomes, never repeating a recipe")
class RandomSearch(StrategyBase):
    """Proposes ``population`` unique random genomes per generation, for ``generations`` tells.

    The first batch starts with the ``initial`` genomes. Results are ignored apart from
    counting generations; a genome's hash is never proposed twice while the space allows it.
    """

    name = "random"

    def __init__(
        self,
        *,
        space: SearchSpace,
        objectives: Sequence[tuple[str, str]],
        population: int,
        generations: int,
        seed: int,
        initial: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(space=space, objectives=objectives, population=population,
                         generations=generations, seed=seed, initial=initial)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._generation = 0
        self._seen: set[str] = set()
        self._pending: list[Genome] | None = None

    @property
    def generation(self) -> int:
        """How many generations have been told."""
        return self._generation

    @property
    def done(self) -> bool:
        return self._generation >= self.generations

    def ask(self) -> list[Genome]:
        if self.done:
            raise RuntimeError(f"the search is done after {self.generations} generations")
        if self._pending is None:
            self._pending = self._propose()
        return [dict(g) for g in self._pending]

    def _propose(self) -> list[Genome]:
        """The next generation's genomes; their hashes are added to ``self._seen``."""
        if self._generation == 0:
            return first_batch(self.space, self._rng, self.population, self._initial,
                               self._seen)
        return sample_unique(self.space, self._rng, self.population, self._seen)

    def tell(self, results: Sequence[Told]) -> None:
        if self.done:
            raise RuntimeError(f"the search is done after {self.generations} generations")
        if not results:
            raise ValueError("tell() needs at least one result")
        for r in results:
            self._seen.add(self.space.genome_hash(r.genome))
        self._pending = None
        self._generation += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "generation": self._generation,
            "rng": rng_state(self._rng),
            "seen": sorted(self._seen),
            "pending": None if self._pending is None else [dict(g) for g in self._pending],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name)
        self._generation = int(state["generation"])
        self._rng = rng_from_state(state["rng"])
        self._seen = set(state["seen"])
        pending = state.get("pending")
        self._pending = None if pending is None else [dict(g) for g in pending]
