"""NSGA-II with EvoPress's level-switch mutation (ICML 2025, arXiv 2410.14649).

The sparsity genes of the pruned layers are mutated only by
:func:`~petra.engine.strategies.operators.level_switch`: one layer's sparsity goes up, another's
down, and the parameters removed stay the same. A child keeps its parent's budget, so the
search explores *where* to compress at a given size; crossover and the other genes (methods,
quantization, the fine-tune) still move the budget. Everything else is :class:`NSGA2`.
"""

from __future__ import annotations

from typing import Any

from petra.engine.strategies.base import STRATEGIES
from petra.engine.strategies.nsga2 import NSGA2
from petra.engine.strategies.operators import level_switch

#: How far one level switch may raise a layer's sparsity.
STEP = 0.1


@STRATEGIES.register("nsga2_level_switch",
                     description="NSGA-II whose sparsity mutation is EvoPress's level switch: "
                     "one layer up, another down, the parameters removed kept")
class NSGA2LevelSwitch(NSGA2):
    name = "nsga2_level_switch"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._params = {f"layers.{layer.name}.sparsity": max(layer.params, 1)
                        for layer in self.space.layers}
        self._levels = [n for n in self._numeric if n.gene.name in self._params]
        self._others = [n for n in self._numeric if n.gene.name not in self._params]
        index = {g.name: i for i, g in enumerate(self.space.genes)}
        # each level's method gene: a layer whose method is "none" has no level to switch
        self._method_of = {n.gene.name: index[n.gene.name.replace(".sparsity", ".method")]
                           for n in self._levels}

    def _mutate(self, child: list[Any]) -> None:
        self._mutate_numeric(child, self._others)
        pruned = [n for n in self._levels if child[self._method_of[n.gene.name]] != "none"]
        values = [float(child[n.index]) for n in pruned]
        if level_switch(values, [self._params[n.gene.name] for n in pruned],
                        [n.gene.low for n in pruned], [n.gene.high for n in pruned], self._rng,
                        step=STEP):
            for n, v in zip(pruned, values, strict=True):
                child[n.index] = n.gene.clip(v)
        self._mutate_categorical(child)
