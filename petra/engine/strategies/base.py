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

from petra.engine.pareto import check_objectives
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
    """The plumbing every strategy shares, as Optuna's ``BaseSampler`` holds a sampler's.

    It owns the space, objectives, sizes, seed and initial genomes; the seeded generator
    (``_rng``); the generation count and ``done``; the pending batch (asking again before a
    tell returns it); the hashes proposed or told (``_seen``); and the common state
    (``strategy``, ``generation``, ``rng``, ``seen``, ``pending``). A strategy implements hooks:

    - :meth:`_propose`: the next batch (default: the initial genomes then random ones, then
      random ones), adding its hashes to ``_seen``;
    - :meth:`_learn`: what it keeps of a told batch (default: the hashes);
    - :meth:`_extra_state` and :meth:`_load_extra_state`: its own state.

    Subclasses are built with the keyword-only arguments of
    :func:`petra.engine.strategies.make_strategy`, which are validated here.
    """

    name = "strategy"

    def __init__(
        self,
        *,
        space: SearchSpace,
        objectives: Sequence[tuple[str, str]],
        population: int,
        generations: int,
        seed: int,
        initial: Iterable[Mapping[str, Any]] = (),
        offspring: int | None = None,
    ) -> None:
        check_sizes(population, generations)
        check_sizes(population if offspring is None else offspring, generations)
        self.space = space
        self.objectives = check_objectives(objectives)
        self.population = int(population)
        # The size of every batch after the first (racing screens more than it keeps).
        self.offspring = self.population if offspring is None else int(offspring)
        self.generations = int(generations)
        self.seed = int(seed)
        self._initial = [dict(g) for g in initial]
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._generation = 0
        self._seen: set[str] = set()
        self._pending: list[Genome] | None = None

    # -- the protocol ---------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """How many generations have been told."""
        return self._generation

    @property
    def done(self) -> bool:
        return self._generation >= self.generations

    def ask(self) -> list[Genome]:
        self._check_open()
        if self._pending is None:
            self._pending = self._propose()
        return [dict(g) for g in self._pending]

    def tell(self, results: Sequence[Told]) -> None:
        self._check_open()
        if not results:
            raise ValueError("tell() needs at least one result")
        self._learn(results)
        self._pending = None
        self._generation += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "generation": self._generation,
            "rng": rng_state(self._rng),
            "seen": sorted(self._seen),
            "pending": None if self._pending is None else [dict(g) for g in self._pending],
            **self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name)
        self._generation = int(state["generation"])
        if "rng" in state:
            self._rng = rng_from_state(state["rng"])
        self._seen = set(state["seen"])
        pending = state.get("pending")
        self._pending = None if pending is None else [dict(g) for g in pending]
        self._load_extra_state(state)

    # -- hooks ----------------------------------------------------------------------------------

    def _propose(self) -> list[Genome]:
        """The next batch; the hashes proposed are added to ``self._seen``."""
        if self._generation == 0:
            return first_batch(self.space, self._rng, self.population, self._initial,
                               self._seen)
        return sample_unique(self.space, self._rng, self.offspring, self._seen)

    def _learn(self, results: Sequence[Told]) -> None:
        """Take in a told batch (any order, failed results included)."""
        for r in results:
            self._seen.add(self.space.genome_hash(r.genome))

    def _extra_state(self) -> dict[str, Any]:
        """The strategy's own JSON-able state, beside the common keys."""
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved (the common keys are restored already)."""

    def _check_open(self) -> None:
        if self.done:
            raise RuntimeError(f"the search is done after {self.generations} generations")
