"""Tests for petra.candidate.evaluate: genome → Recipe, and one candidate evaluated end to end."""

import math

import pytest

from petra.candidate.evaluate import COMPLETE, FAILED, Recipe, Result
from tests.conftest import DIGITS_CNN_CONVS

CONVS = DIGITS_CNN_CONVS
METRICS = {"val_accuracy", "artifact_bytes", "size_ratio", "latency_ms", "latency_ratio",
           "latency_ratio_iqr", "baseline_latency_ms", "params", "params_dense", "macs",
           "eval_time_s"}


def every_conv(method, sparsity):
    genome = {}
    for name in CONVS:
        genome[f"layers.{name}.method"] = method
        genome[f"layers.{name}.sparsity"] = sparsity
    return genome


# --- Recipe ----------------------------------------------------------------------------------


def test_recipe_from_genome_parses_every_gene():
    recipe = Recipe.from_genome({
        "layers.stem.method": "l2_channel", "layers.stem.sparsity": 0.5,
        "layers.layer1.conv1.method": "magnitude", "layers.layer1.conv1.sparsity": "0.25",
        "layers.layer2.conv1.method": "none", "layers.layer2.conv1.sparsity": 0.7,
        "layers.layer3.conv1.method": "magnitude", "layers.layer3.conv1.sparsity": 0.0,
        "layers.fc.method": "magnitude",  # no sparsity gene: zero, so no pruning
        "prune.round_to": "8", "quant.scheme": "int8_static", "reg.kind": "l1",
        "reg.strength": 1e-4, "finetune.epochs": 2.0, "finetune.lr": "0.005",
    })
    assert recipe.layers == {"stem": ("l2_channel", 0.5), "layer1.conv1": ("magnitude", 0.25)}
    assert recipe.round_to == 8 and isinstance(recipe.round_to, int)
    assert recipe.quant == "int8_static"
    assert (recipe.reg, recipe.reg_strength) == ("l1", 1e-4)
    assert recipe.epochs == 2 and isinstance(recipe.epochs, int)
    assert recipe.lr == 0.005


def test_empty_genome_is_the_identity_recipe():
    assert Recipe.from_genome({}) == Recipe()
    assert Recipe().layers == {} and Recipe().quant == "none" and Recipe().epochs == 0


def test_a_single_configured_round_to_reaches_the_recipe(tiny_task):
    from petra.config import load_config
    from petra.space import build_space, prunable_layers

    task, _ = tiny_task
    cfg = load_config({"space": {"pruning": ["none", "l2_channel"], "round_to": [8]}})
    space = build_space(cfg.space, prunable_layers(task.model, task.example_input))
    genome = space.complete(every_conv("l2_channel", 0.5))
    assert Recipe.from_genome(genome).round_to == 8


def test_result_objective_values():
    result = Result(genome={}, genome_hash="h", status=COMPLETE,
                    metrics={"val_accuracy": 0.9, "artifact_bytes": 100.0})
    assert result.objective_values([("val_accuracy", "max"), ("artifact_bytes", "min")]) == (
        0.9, 100.0)
    assert result.objective_values([("val_accuracy", "max"), ("macs", "min")]) is None
    failed = Result(genome={}, genome_hash="h", status=FAILED, metrics={"val_accuracy": 0.9})
    assert failed.objective_values([("val_accuracy", "max")]) is None


# --- evaluate --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_result(evaluator):
    return evaluator.evaluate({}, genome_hash="dense")


def test_empty_genome_reproduces_the_baseline(dense_result, tiny_task):
    _, baseline = tiny_task
    result = dense_result
    assert result.status == COMPLETE, result.error
    assert result.error is None and result.genome_hash == "dense"
    assert METRICS <= result.metrics.keys()
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert 0.9 <= result.metrics["size_ratio"] <= 1.1
    assert result.metrics["artifact_bytes"] == len(result.artifact)
    assert result.info["effective"]["bytes"] is False
    assert result.info["channels"] == {}
    assert result.metrics["val_accuracy"] == pytest.approx(baseline.metrics["val_accuracy"])
    assert result.metrics["params"] == result.metrics["params_dense"] == baseline.metrics["params"]
    assert result.metrics["macs"] == baseline.metrics["macs"]
    assert result.metrics["latency_ratio"] > 0


def test_test_accuracy_of_an_artifact(evaluator, dense_result, tiny_task):
    _, baseline = tiny_task
    accuracy = evaluator.test_accuracy(dense_result.artifact)
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(baseline.metrics["test_accuracy"])


def test_channel_pruning_every_conv_shrinks_the_artifact(evaluator, tiny_task):
    _, baseline = tiny_task
    genome = {**every_conv("l2_channel", 0.5), "prune.round_to": 1}
    result = evaluator.evaluate(genome)
    assert result.status == COMPLETE, result.error
    assert result.metrics["size_ratio"] < 0.6
    assert result.metrics["params_dense"] < baseline.metrics["params_dense"]
    assert result.metrics["macs"] < baseline.metrics["macs"]
    assert result.info["effective"]["bytes"] is True
    assert result.info["channels"] and all(
        after < before for before, after in result.info["channels"].values())
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0


def test_the_recipe_shows_the_removal_a_candidate_made(evaluator):
    """A front member read ``l2_channelx2@0.03 round8`` where rounding to 8 left the 32
    channels whole, beside a twin with no such gene: the label said what was asked. With the
    candidate's metrics it says what was removed."""
    from petra.space import summarize

    genome = {"layers.layer1.conv1.method": "l2_channel", "layers.layer1.conv1.sparsity": 0.5,
              "layers.layer3.conv1.method": "l2_channel", "layers.layer3.conv1.sparsity": 0.03,
              "prune.round_to": 8}
    result = evaluator.evaluate(genome)
    assert result.status == COMPLETE, result.error
    assert result.metrics["sparsity.layer3.conv1"] == 0.0
    assert result.metrics["sparsity.layer1.conv1"] == 0.5
    assert summarize(genome) == "l2_channelx2@0.27 round8"
    assert summarize(genome, result.metrics) == "l2_channelx1@0.50 round8"
    only = {**genome, "layers.layer1.conv1.method": "none"}
    assert summarize(only, {"sparsity.layer3.conv1": 0.0}) == "dense"


def test_magnitude_pruning_survives_fine_tuning(evaluator, tiny_task):
    _, baseline = tiny_task
    genome = {**every_conv("magnitude", 0.9), "finetune.epochs": 1, "finetune.lr": 1e-3,
              "reg.kind": "l1", "reg.strength": 1e-5}
    result = evaluator.evaluate(genome)
    assert result.status == COMPLETE, result.error
    assert result.metrics["size_ratio"] < 0.6
    assert result.metrics["params_dense"] == baseline.metrics["params_dense"]  # shapes unchanged
    assert result.metrics["params"] < 0.3 * result.metrics["params_dense"]
    assert result.info["effective"]["bytes"] is True


def test_int8_static_shrinks_and_keeps_accuracy(evaluator, tiny_task):
    _, baseline = tiny_task
    result = evaluator.evaluate({"quant.scheme": "int8_static"})
    assert result.status == COMPLETE, result.error
    assert result.metrics["size_ratio"] < 0.45
    assert abs(result.metrics["val_accuracy"] - baseline.metrics["val_accuracy"]) <= 0.05
    assert 0.0 <= evaluator.test_accuracy(result.artifact) <= 1.0


def test_unknown_method_gives_a_failed_result_without_raising(evaluator):
    genome = {"layers.stem.method": "random_pruning", "layers.stem.sparsity": 0.5}
    result = evaluator.evaluate(genome, genome_hash="abc")
    assert result.status == FAILED
    assert "random_pruning" in result.error and result.error.startswith("ValueError")
    assert result.genome == genome and result.genome_hash == "abc"
    assert result.artifact is None
    assert "traceback" in result.info
    assert result.objective_values([("val_accuracy", "max")]) is None


def test_same_genome_and_seed_give_the_same_candidate_whatever_ran_before(evaluator):
    genome = {"finetune.epochs": 1, "finetune.lr": 1e-3, "quant.scheme": "int8_static"}
    first = evaluator.evaluate(genome, seed=5)
    evaluator.evaluate({"finetune.epochs": 2, "finetune.lr": 3e-3}, seed=9)  # advances RNGs
    again = evaluator.evaluate(genome, seed=5)
    assert first.status == again.status == "complete"
    assert again.metrics["val_accuracy"] == first.metrics["val_accuracy"]
    assert again.artifact == first.artifact


def test_the_baseline_counts_its_non_zero_parameters_as_a_candidate_does(tmp_path):
    """``petra evaluate`` printed ``params 86595 (baseline 86659)`` for a Cohere that lost
    nothing: a candidate's ``params`` are its non-zero ones, the baseline's were every one,
    and 64 was its embedding's zero padding row."""
    import torch
    from torch import nn

    from petra.candidate.baseline import prepare_baseline
    from petra.tasks import Task
    from petra.tasks.contract import adapt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(20, 3))
    ids, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 3, (8,))
    task = adapt(Task(model=model, train=[(ids, y)], val=[(ids, y)], test=[(ids, y)],
                      example_input=ids, trained=True))
    metrics = prepare_baseline(task, task_name="padded", task_params={}, cache_dir=tmp_path).metrics
    assert metrics["params_dense"] == 40 + 63
    assert metrics["params"] == 40 + 63 - 4  # the padding row


def test_the_recipe_leaves_out_factors_that_would_not_have_paid(evaluator):
    """svd on a layer whose rank at the candidate's energy is above what two thin layers save
    leaves it whole: a front member's label read ``svdx2`` where one layer was factorized."""
    from petra.space import summarize

    genome = {"layers.layer2.conv2.method": "svd", "layers.layer1.downsample.0.method": "svd",
              "lowrank.energy": 0.9}
    result = evaluator.evaluate(genome)
    assert result.status == COMPLETE, result.error
    assert set(result.info["ranks"]) == {"layer2.conv2"}  # 13 of 16; the 8x8 conv keeps 5
    assert result.metrics["sparsity.layer1.downsample.0"] == 0.0
    assert 0.0 < result.metrics["sparsity.layer2.conv2"] < 0.2
    assert summarize(genome) == "svdx2"
    assert summarize(genome, result.metrics) == "svdx1"
