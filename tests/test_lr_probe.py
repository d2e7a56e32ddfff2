"""The seed lr probe (petra.candidate.lr_probe): which lrs it tries, how it chooses, that a real
fine-tune at a destructive lr is rejected, and that a search uses, logs and caches its choice."""

from __future__ import annotations

import json
import math

import pytest

from petra.candidate.lr_probe import candidate_lrs, choose, probe_steps, run_probe
from petra.candidate.recipes import grid_points, seed_recipes
from petra.config import load_config
from petra.space import model_space
from petra.tasks import load_task
from tests.conftest import TINY_TASK


def space_with(lr: list[float] | None, epochs: list[int] | None = None):
    task = load_task("digits_cnn", {"width": 8})
    finetune = {**({"lr": lr} if lr else {}), **({"epochs": epochs} if epochs else {})}
    cfg = load_config({"task": {"name": "digits_cnn", "params": {"width": 8}},
                       "space": {"pruning": ["none", "l2_channel"], "quantization": ["none"],
                                 "regularizer": ["none", "kd"], "finetune": finetune}})
    return model_space(cfg.space, task.model, task.example_input)


def test_the_probe_starts_at_the_clipped_default_and_steps_down_half_decades():
    # (a log gene keeps 3 significant digits)
    assert candidate_lrs(space_with([1e-4, 1e-3])) == pytest.approx([1e-3, 10 ** -3.5, 1e-4],
                                                                    rel=1e-3)
    assert candidate_lrs(space_with([1e-3, 1e-2])) == pytest.approx(
        [5e-3, 5e-3 / 10 ** 0.5, 1e-3], rel=1e-3)
    assert candidate_lrs(space_with(None)) == pytest.approx([5e-3, 5e-3 / 10 ** 0.5, 5e-4],
                                                            rel=1e-3)
    assert candidate_lrs(space_with([2e-3, 2e-3])) == []  # one value: nothing to probe
    assert candidate_lrs(space_with([1e-4, 1e-3], epochs=[0, 0])) == []  # no fine-tune


def test_the_highest_lr_within_the_tolerance_of_the_best_loss_is_chosen():
    lrs = [1e-3, 3e-4, 1e-4]
    assert choose(lrs, [0.35, 0.07, 0.11]) == 3e-4  # 1e-3 did damage (5x the best loss)
    assert choose(lrs, [0.24, 0.19, 0.20]) == 1e-3  # within 2x: the higher lr is kept
    assert choose(lrs, [math.inf, 0.2, 0.1]) == 3e-4  # diverged: never chosen
    assert choose(lrs, [math.inf] * 3) == 1e-4


def test_a_probe_runs_a_quarter_epoch_within_bounds():
    assert probe_steps(88) == 22
    assert probe_steps(17) == 17  # at least 20 steps, but never past one epoch
    assert probe_steps(2000) == 200
    assert probe_steps(None) == 20


def test_a_destructive_lr_is_measured_as_such_and_rejected(evaluator):
    """Real fine-tunes of the tiny digits_cnn, 8 batches each: lr 30 wrecks the model."""
    genome = {"layers.layer1.conv1.method": "l2_channel", "layers.layer1.conv1.sparsity": 0.25,
              "finetune.epochs": 1}
    probe = run_probe(evaluator, genome, [30.0, 5e-3], steps=8, seed=0)
    assert probe.steps == 8 and probe.lrs == [30.0, 5e-3]
    assert probe.val_loss[0] > 2 * probe.val_loss[1]
    assert probe.val_metric[1] > 0.5 > probe.val_metric[0]
    assert probe.chosen == 5e-3 and probe.seconds > 0


def test_the_seed_recipes_and_the_grid_use_the_probed_lr():
    space = space_with([1e-4, 1e-3])
    assert {g["finetune.lr"] for g in seed_recipes(space)} == {1e-3}
    space.seed_lr = 3e-4
    assert {g["finetune.lr"] for g in seed_recipes(space)} == {3e-4}
    assert {g["finetune.lr"] for g in grid_points(space, 6)} == {3e-4}
    space.seed_lr = 1.0  # clipped to the space
    assert {g["finetune.lr"] for g in seed_recipes(space)} == {1e-3}


@pytest.mark.parametrize("strategy, probed", [("nsga2", True), ("grid", True),
                                               ("random", False)])
def test_a_search_logs_its_probe_and_reuses_it(tmp_path, monkeypatch, strategy, probed):
    from mlflow.tracking import MlflowClient

    from petra.engine.loop import resume, search
    from petra.tracking.store import Tracker

    cfg = load_config({
        "name": f"probe-{strategy}", "seed": 5, "task": TINY_TASK,
        "space": {"pruning": ["none", "l2_channel"], "sparsity": [0.0, 0.5],
                  "layers": {"exclude": ["fc"]}, "quantization": ["none"],
                  "finetune": {"epochs": [0, 1], "lr": [1e-3, 1e-2]}},
        "search": {"strategy": strategy, "population": 2, "generations": 1},
        "execution": {"executor": "local"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "probe"},
    })
    lines: list[str] = []
    result = search(cfg, progress=lines.append)
    run = MlflowClient(cfg.tracking.uri).get_run(result.run_id)
    if not probed:
        assert "petra.seed_lr" not in run.data.tags
        assert not any("fine-tune lr" in line for line in lines)
        return
    logged = json.loads(Tracker.read_text(cfg.tracking.uri, result.run_id, "lr_probe.json"))
    assert logged["lrs"] == pytest.approx([5e-3, 5e-3 / 10 ** 0.5, 1e-3], rel=1e-3)
    assert len(logged["val_loss"]) == 3 and logged["chosen"] in logged["lrs"]
    assert float(run.data.tags["petra.seed_lr"]) == pytest.approx(logged["chosen"])
    assert run.data.metrics["lr_probe_s"] > 0
    # the seed recipes (nsga2), or every grid point, fine-tune at the chosen lr
    lrs = [r["genome"].get("finetune.lr") for r in result.records]
    assert any(lr == pytest.approx(logged["chosen"]) for lr in lrs)
    # a second search of the same model reuses the probe (cached with the baseline)
    again: list[str] = []
    search(cfg, progress=again.append)
    assert any("cached)" in line for line in again if line.startswith("fine-tune lr"))
    assert not any("probing" in line for line in again)
    # a resumed search takes the lr its run recorded, never a new probe, even with the cache gone
    monkeypatch.setenv("PETRA_CACHE", str(tmp_path / "emptied-cache"))
    resumed: list[str] = []
    resume(result.run_id, uri=cfg.tracking.uri, progress=resumed.append)
    assert not any("probing" in line for line in resumed)
    assert any(line.startswith(f"fine-tune lr: {logged['chosen']:.3g} ")
               and "as the run recorded" in line for line in resumed), resumed
