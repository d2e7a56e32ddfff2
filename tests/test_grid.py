"""The uniform grid: the by-hand baseline of benchmarks/front_quality.py."""

from petra.candidate.recipes import seed_recipes
from petra.config import load_config
from petra.engine.strategies import Told, make_strategy
from petra.engine.strategies.grid import grid_points
from petra.space import model_space
from petra.tasks import load_task


def digits_space():
    task = load_task("digits_cnn", {"width": 8})
    cfg = load_config("search_spaces/digits_cnn.yaml")
    return model_space(cfg.space, task.model, task.example_input)


def test_every_grid_point_is_one_ratio_on_every_layer_with_or_without_int8():
    space = digits_space()
    points = grid_points(space, 12)
    assert len(points) == 12
    ratios = set()
    for genome in points:
        methods = {genome[f"layers.{layer.name}.method"] for layer in space.layers
                   if f"layers.{layer.name}.method" in genome}
        sparsities = {genome[f"layers.{layer.name}.sparsity"] for layer in space.layers
                      if f"layers.{layer.name}.sparsity" in genome}
        assert methods in ({"none"}, {"l2_channel"})
        assert len(sparsities) == 1
        ratios |= sparsities
        assert genome["quant.scheme"] in ("none", "int8_static")
        assert genome["finetune.epochs"] == space.gene("finetune.epochs").high
        assert genome["reg.kind"] == "kd" and genome["prune.round_to"] == 8
        # exactly the seed recipes' fine-tune: the two arms differ only in compression
        for key in ("finetune.epochs", "finetune.lr", "reg.kind", "reg.kd_alpha",
                    "reg.kd_temperature"):
            assert genome[key] == seed_recipes(space)[0][key], key
    assert sorted(ratios) == [0.0, 0.18, 0.36, 0.54, 0.72, 0.9]
    assert sum(g["quant.scheme"] == "int8_static" for g in points) == 6


def test_the_grid_search_proposes_the_grid_once_in_a_seeded_order():
    space = digits_space()
    objectives = [("val_accuracy", "max"), ("artifact_bytes", "min")]

    def proposals(seed):
        strategy = make_strategy("grid", space=space, objectives=objectives, population=4,
                                 generations=3, seed=seed)
        out = []
        while not strategy.done:
            batch = strategy.ask()
            out += batch

            strategy.tell([Told(genome=g, values=(0.5, 1.0), status="complete") for g in batch])
        return out

    first, other = proposals(0), proposals(1)
    hashes = [space.genome_hash(g) for g in first]
    grid = {space.genome_hash(g) for g in grid_points(space, 12)}
    assert set(hashes) == grid and len(hashes) == 12
    assert first != other and {space.genome_hash(g) for g in other} == grid
