"""EvoPress's level-switch mutation: the parameters removed stay the same."""

import numpy as np
import pytest

from petra.engine.strategies import make_strategy
from petra.engine.strategies.level_switch import NSGA2LevelSwitch
from petra.engine.strategies.operators import level_switch
from petra.layers import LayerInfo
from petra.space import Categorical, Float, SearchSpace


def test_a_level_switch_keeps_the_parameters_removed_and_the_bounds():
    rng = np.random.default_rng(0)
    weights = [1000.0, 250.0, 4000.0, 250.0]
    values = [0.2, 0.5, 0.1, 0.9]
    budget = sum(w * v for w, v in zip(weights, values, strict=True))
    moved = 0
    for _ in range(200):
        before = list(values)
        moved += level_switch(values, weights, [0.0] * 4, [0.9] * 4, rng, step=0.1)
        assert sum(w * v for w, v in zip(weights, values, strict=True)) == pytest.approx(budget)
        assert all(0.0 <= v <= 0.9 + 1e-12 for v in values)
        assert sum(a != b for a, b in zip(before, values, strict=True)) in (0, 2)
    assert moved > 150


def test_nothing_moves_without_a_pair():
    rng = np.random.default_rng(0)
    assert not level_switch([0.5], [10.0], [0.0], [0.9], rng)
    assert not level_switch([0.9, 0.9], [1.0, 1.0], [0.0, 0.0], [0.9, 0.9], rng)  # none can rise


def test_mutation_alone_keeps_a_childs_budget_within_a_step():
    layers = [LayerInfo(f"l{i}", "Conv2d", 16, p, True) for i, p in enumerate((100, 400, 400))]
    genes = []
    for layer in layers:
        genes += [Categorical(f"layers.{layer.name}.method", ("none", "l2_channel"), "none"),
                  Float(f"layers.{layer.name}.sparsity", 0.0, 0.9, 0.0, step=0.01)]
    space = SearchSpace(genes, layers=layers)
    strategy = make_strategy("nsga2_level_switch", space=space,
                             objectives=[("val_accuracy", "max"), ("artifact_bytes", "min")],
                             population=4, generations=2, seed=0)
    assert isinstance(strategy, NSGA2LevelSwitch)
    child = ["l2_channel", 0.4] * len(layers)
    for _ in range(50):
        before = sum(layer.params * child[2 * i + 1] for i, layer in enumerate(layers))
        strategy._mutate(child)
        child[0::2] = ["l2_channel"] * 3  # keep every layer pruned for the budget to apply
        after = sum(layer.params * child[2 * i + 1] for i, layer in enumerate(layers))
        assert after == pytest.approx(before, abs=400 * 0.01)  # the genes' 0.01 step
    assert child[1::2] != [0.4, 0.4, 0.4]  # the levels moved
