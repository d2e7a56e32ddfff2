"""The by-hand baseline as a strategy: one structured ratio on every layer × {fp32, int8}.

This is what a competent engineer without petra does first: remove the same fraction of
channels from every prunable layer (the first structured criterion the space offers there,
``l2_channel`` by preference; ``l2_units`` on a GRU), with and without ``int8_static``, and fine-tune
every point the same way (the space's longest fine-tune, distillation when the space offers it,
channels rounded to 8). The ratios are spread evenly over the space's sparsity range so that
``population × generations`` evaluations cover the grid; the seed only orders the points (and
seeds each candidate's fine-tune). When the grid is exhausted, further points are random.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from petra.space import Genome, SearchSpace
from petra.strategies.base import (
    STRATEGIES,
    StrategyBase,
    Told,
    check_state,
    rng_from_state,
    rng_state,
    sample_unique,
)

#: Structured criteria, in the order the grid prefers them.
PREFERRED = ("l2_channel", "l1_channel", "fpgm", "bn_scale", "taylor", "l2_units")
QUANT = ("none", "int8_static")


def structured_method(space: SearchSpace, layer: str) -> str | None:
    """The structured criterion a by-hand recipe uses on ``layer``: the first of
    :data:`PREFERRED` that the space offers there, else any structured one, else None."""
    import petra.compress  # noqa: F401  (fills the registries)
    from petra.registry import PRUNING

    name = f"layers.{layer}.method"
    choices = getattr(space.gene(name), "choices", ()) if name in space else ()
    return next((m for m in PREFERRED if m in choices),
                next((m for m in choices if m in PRUNING
                      and PRUNING.get(m).meta.get("structured")), None))


def grid_points(space: SearchSpace, budget: int) -> list[Genome]:
    """The uniform recipes of a grid of about ``budget`` points (see the module doc)."""
    quants = [q for q in QUANT if space.offers("quant.scheme", q)] or [None]
    methods: dict[str, str] = {}
    high = 0.0
    for layer in space.layers:
        method = structured_method(space, layer.name)
        if method is not None:
            methods[layer.name] = method
            high = max(high, getattr(space.gene(f"layers.{layer.name}.sparsity"), "high", 0.0))
    extra: dict[str, Any] = {}
    if "finetune.epochs" in space:
        extra["finetune.epochs"] = space.gene("finetune.epochs").high
    if space.offers("reg.kind", "kd"):
        extra["reg.kind"] = "kd"
    if space.offers("prune.round_to", 8):
        extra["prune.round_to"] = 8
    n_ratios = max(1, math.ceil(budget / len(quants))) if methods else 1
    ratios = np.linspace(0.0, high, n_ratios) if n_ratios > 1 else np.array([0.0])
    points, seen = [], set()
    for ratio in ratios:
        for quant in quants:
            partial = dict(extra)
            if quant is not None:
                partial["quant.scheme"] = quant
            for layer, method in methods.items():
                if ratio > 0:
                    partial[f"layers.{layer}.method"] = method
                    partial[f"layers.{layer}.sparsity"] = float(ratio)
            genome = space.complete(partial)
            key = space.genome_hash(genome)
            if key not in seen:
                seen.add(key)
                points.append(genome)
    return points


@STRATEGIES.register(
    "grid", description="by-hand baseline: one structured ratio on every layer x {fp32, int8}"
)
class UniformGrid(StrategyBase):
    """Proposes the uniform grid of ``population × generations`` points, in a seeded order.

    The first batch starts with the ``initial`` genomes. Results are ignored apart from
    counting generations.
    """

    name = "grid"

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
        points = grid_points(space, self.population * self.generations)
        order = self._rng.permutation(len(points))
        self._queue: list[Genome] = [*(space.complete(g) for g in self._initial[:population]),
                                     *(points[i] for i in order)]
        self._cursor = 0
        self._generation = 0
        self._seen: set[str] = set()
        self._pending: list[Genome] | None = None

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def done(self) -> bool:
        return self._generation >= self.generations

    def ask(self) -> list[Genome]:
        if self.done:
            raise RuntimeError(f"the search is done after {self.generations} generations")
        if self._pending is None:
            batch: list[Genome] = []
            while len(batch) < self.population and self._cursor < len(self._queue):
                genome = self._queue[self._cursor]
                self._cursor += 1
                key = self.space.genome_hash(genome)
                if key not in self._seen:
                    self._seen.add(key)
                    batch.append(dict(genome))
            batch += sample_unique(self.space, self._rng, self.population - len(batch),
                                   self._seen)
            self._pending = batch
        return [dict(g) for g in self._pending]

    def tell(self, results: Sequence[Told]) -> None:
        if self.done:
            raise RuntimeError(f"the search is done after {self.generations} generations")
        if not results:
            raise ValueError("tell() needs at least one result")
        self._pending = None
        self._generation += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "generation": self._generation,
            "cursor": self._cursor,
            "rng": rng_state(self._rng),
            "seen": sorted(self._seen),
            "pending": None if self._pending is None else [dict(g) for g in self._pending],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name)
        self._generation = int(state["generation"])
        self._cursor = int(state["cursor"])
        self._rng = rng_from_state(state["rng"])
        self._seen = set(state["seen"])
        pending = state.get("pending")
        self._pending = None if pending is None else [dict(g) for g in pending]
