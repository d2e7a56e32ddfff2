"""The ask/tell ``Strategy`` protocol, the ``Told`` result, seeds, and helpers shared by strategies.

A strategy proposes a batch of plain genome dicts with :meth:`Strategy.ask`, and is told the
outcome of each with :meth:`Strategy.tell`. It never sees models, workers or MLflow, so every
strategy is tested in process, and the search loop is a short loop around it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from petra.errors import STATUSES
from petra.registry import STRATEGIES  # noqa: F401  (re-exported)
from petra.space import Genome, SearchSpace

#: How many times a strategy redraws a genome whose hash was already proposed.
MAX_TRIES = 20


@dataclass(frozen=True)
class Told:
    """The outcome of one proposed genome.

    Attributes:
        genome: the genome as proposed (a partial genome is completed with the defaults).
        values: the objective values in the config's own units and order; ``None`` when the
            evaluation failed.
        status: "complete", "failed" or "pruned".
    """

    genome: Genome
    values: tuple[float, ...] | None
    status: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}; got {self.status!r}")


@runtime_checkable
class Strategy(Protocol):
    """Proposes genomes in batches, and learns from their results."""

    def ask(self) -> list[Genome]:
        """The next batch. Asking again before :meth:`tell` returns the same batch."""
        ...

    def tell(self, results: Sequence[Told]) -> None:
        """The outcomes of the last batch (any order; failed ones included)."""
        ...

    @property
    def done(self) -> bool:
        """True once the strategy has been told its last generation."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict from which :meth:`load_state_dict` resumes the search."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def candidate_seed(seed: int, generation: int, index: int) -> int:
    """The seed of the ``index``-th candidate of ``generation`` in a search seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, generation, index]).generate_state(1)[0])


def check_sizes(population: int, generations: int) -> None:
    if not isinstance(population, (int, np.integer)) or population < 1:
        raise ValueError(f"population must be an integer >= 1; got {population!r}")
    if not isinstance(generations, (int, np.integer)) or generations < 1:
        raise ValueError(f"generations must be an integer >= 1; got {generations!r}")


def first_batch(
    space: SearchSpace,
    rng: np.random.Generator,
    population: int,
    initial: Iterable[Mapping[str, Any]],
    seen: set[str],
) -> list[Genome]:
    """``initial`` genomes (completed, deduplicated, at most ``population``), then random ones.

    Every hash proposed is added to ``seen``.
    """
    batch = space.distinct(initial, seen, limit=population)
    batch += sample_unique(space, rng, population - len(batch), seen)
    return batch


def sample_unique(
    space: SearchSpace, rng: np.random.Generator, count: int, seen: set[str]
) -> list[Genome]:
    """``count`` random genomes whose hashes are not in ``seen`` (nor repeated), where possible.

    Each genome is redrawn up to :data:`MAX_TRIES` times, then accepted as it is, so a space
    smaller than the search still yields full batches. Their hashes are added to ``seen``.
    """
    batch = []
    for _ in range(count):
        genome = space.sample(rng)
        for _ in range(MAX_TRIES):
            if space.genome_hash(genome) not in seen:
                break
            genome = space.sample(rng)
        seen.add(space.genome_hash(genome))
        batch.append(genome)
    return batch


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The JSON-able state of a PCG64 generator."""
    return dict(rng.bit_generator.state)


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    bit_generator = np.random.PCG64()
    bit_generator.state = dict(state)
    return np.random.Generator(bit_generator)


def check_state(state: Mapping[str, Any], strategy: str) -> None:
    got = state.get("strategy")
    if got != strategy:
        raise ValueError(f"state_dict is for strategy {got!r}, not {strategy!r}")


class StrategyBase:
    """What every strategy holds: the space, objectives, sizes, seed and initial genomes.

    Subclasses call ``super().__init__(...)`` with the keyword-only arguments of
    :func:`petra.strategies.make_strategy`, which validates the sizes.
    """

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
        from petra.pareto import check_objectives

        check_sizes(population, generations)
        self.space = space
        self.objectives = check_objectives(objectives)
        self.population = int(population)
        self.generations = int(generations)
        self.seed = int(seed)
        self._initial = [dict(g) for g in initial]
