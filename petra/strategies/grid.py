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
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from petra.space import Genome, SearchSpace
from petra.strategies.base import STRATEGIES, sample_unique
from petra.strategies.random_search import RandomSearch

#: Structured criteria, in the order the grid prefers them.
PREFERRED = ("l2_channel", "l1_channel", "fpgm", "bn_scale", "taylor", "l2_units")
QUANT = ("none", "int8_static")


def structured_method(space: SearchSpace, layer: str) -> str | None:
    """The structured criterion a by-hand recipe uses on ``layer``: the first of
    :data:`PREFERRED` that the space offers there, else any structured one, else None."""
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
    def points() -> Iterable[dict[str, Any]]:
        for ratio in ratios:
            for quant in quants:
                partial = dict(extra)
                if quant is not None:
                    partial["quant.scheme"] = quant
                for layer, method in methods.items():
                    if ratio > 0:
                        partial[f"layers.{layer}.method"] = method
                        partial[f"layers.{layer}.sparsity"] = float(ratio)
                yield partial

    return space.distinct(points())


@STRATEGIES.register(
    "grid", description="by-hand baseline: one structured ratio on every layer x {fp32, int8}"
)
class UniformGrid(RandomSearch):
    """Proposes the uniform grid of ``population × generations`` points, in a seeded order.

    The first batch starts with the ``initial`` genomes; random genomes follow once the grid
    is spent. Results are ignored apart from counting generations. Generations, the generator,
    the hashes proposed and a pending batch are kept as by :class:`RandomSearch`, plus the
    cursor into the grid.
    """

    name = "grid"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        points = grid_points(self.space, self.population * self.generations)
        order = self._rng.permutation(len(points))
        self._queue: list[Genome] = [
            *(self.space.complete(g) for g in self._initial[: self.population]),
            *(points[i] for i in order)]
        self._cursor = 0

    def _propose(self) -> list[Genome]:
        batch: list[Genome] = []
        while len(batch) < self.population and self._cursor < len(self._queue):
            batch += self.space.distinct([self._queue[self._cursor]], self._seen)
            self._cursor += 1
        return batch + sample_unique(self.space, self._rng, self.population - len(batch),
                                     self._seen)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cursor": self._cursor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._cursor = int(state["cursor"])
