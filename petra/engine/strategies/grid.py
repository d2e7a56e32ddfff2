"""The by-hand baseline as a strategy: one structured ratio on every layer × {fp32, int8}.

This is what a competent engineer without petra does first: remove the same fraction of
channels from every prunable layer (the first structured criterion the space offers there,
``l2_channel`` by preference; ``l2_units`` on a GRU), with and without ``int8_static``, and fine-tune
every point the same way (the seed recipes' fine-tune: the space's longest, at the search's
probed seed lr (:mod:`petra.candidate.lr_probe`), distillation when the space offers it;
channels rounded to 8). The ratios are spread evenly over the space's sparsity range so that
``population × generations`` evaluations cover the grid; the seed only orders the points (and
seeds each candidate's fine-tune). When the grid is exhausted, further points are random.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from petra.candidate.recipes import grid_points
from petra.engine.strategies.base import STRATEGIES, sample_unique
from petra.engine.strategies.random_search import RandomSearch
from petra.space import Genome


@STRATEGIES.register(
    "grid", description="by-hand baseline: one structured ratio on every layer x {fp32, int8}",
    baseline=True, seed_finetune=True,
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

    def _extra_state(self) -> dict[str, Any]:
        return {"cursor": self._cursor}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._cursor = int(state["cursor"])
