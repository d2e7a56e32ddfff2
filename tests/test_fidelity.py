"""Multi-fidelity: the rung's decisions, the learned headroom, and pruned candidates."""

from __future__ import annotations

import math

import pytest

from petra.evaluate import COMPLETE, PRUNED
from petra.fidelity import Rung, learn_headroom, rung_for_generation
from tests.conftest import DIGITS_CNN_CONVS

OBJECTIVES = (("val_accuracy", "max"), ("artifact_bytes", "min"), ("latency_ratio", "min"))
BASELINE = {"val_accuracy": 0.95, "artifact_bytes": 1000.0}
FRONT = ({"val_accuracy": 0.94, "artifact_bytes": 200.0, "latency_ratio": 0.4},
         {"val_accuracy": 0.90, "artifact_bytes": 100.0, "latency_ratio": 0.3})


def probe(acc: float, size: float, latency: float, iqr: float = 0.0) -> dict[str, float]:
    return {"val_accuracy": acc, "artifact_bytes": size, "latency_ratio": latency,
            "latency_ratio_iqr": iqr, "size_ratio": size / 1000.0}


def rung(**kw) -> Rung:
    args = {"epochs": 1, "objectives": OBJECTIVES, "front": FRONT, "baseline": BASELINE,
            "constraints": {}, "headroom": 0.02}
    return Rung(**{**args, **kw})


def test_a_rung_applies_only_to_longer_fine_tunes():
    r = rung(epochs=2)
    assert not r.applies(0) and not r.applies(2) and r.applies(3)


def test_dominated_even_with_the_headroom_stops():
    # 0.80 + 0.02 < 0.90 with more bytes and latency than the second front member
    assert "dominated" in rung().stop_reason(probe(0.80, 150.0, 0.35))


def test_the_headroom_can_lift_a_candidate_onto_the_front():
    # 0.89 + 0.02 = 0.91 beats the second member's 0.90 at the same size and latency
    assert rung().stop_reason(probe(0.89, 100.0, 0.3)) is None
    assert rung(headroom=0.0).stop_reason(probe(0.89, 100.0, 0.3)) is not None


def test_the_latency_spread_counts_in_the_candidates_favour():
    # latency 0.32 with an IQR of 0.05 could be 0.27, below the second member's 0.3
    assert rung(headroom=0.0).stop_reason(probe(0.90, 100.0, 0.32, iqr=0.05)) is None
    assert rung(headroom=0.0).stop_reason(probe(0.90, 100.0, 0.32, iqr=0.0)) is not None


def test_no_stop_for_the_front_until_the_headroom_is_known_or_without_a_front():
    assert rung(headroom=None).stop_reason(probe(0.10, 900.0, 0.99)) is None
    assert rung(front=()).stop_reason(probe(0.10, 900.0, 0.99)) is None


def test_bytes_and_latency_constraints_stop_at_the_probe():
    r = rung(headroom=None, constraints={"max_bytes": 500.0, "max_latency_ratio": None,
                                         "max_accuracy_drop": 0.01})
    assert "constraints" in r.stop_reason(probe(0.0, 600.0, 0.5), probe_only=True)
    # the accuracy constraint is not judged before the fine-tune, nor without a headroom
    assert r.stop_reason(probe(0.0, 400.0, 0.5), probe_only=True) is None
    assert r.stop_reason(probe(0.0, 400.0, 0.5)) is None


def test_the_accuracy_constraint_is_judged_with_the_headroom():
    r = rung(front=(), constraints={"max_accuracy_drop": 0.05})  # floor 0.90
    assert r.stop_reason(probe(0.87, 400.0, 0.5)) is not None  # 0.89 < 0.90
    assert r.stop_reason(probe(0.89, 400.0, 0.5)) is None  # 0.91 >= 0.90


def record(gen, acc, rung_acc=None, status=COMPLETE, size=100.0):
    metrics = {"val_accuracy": acc, "artifact_bytes": size, "latency_ratio": 0.5}
    if rung_acc is not None:
        metrics["rung_val_accuracy"] = rung_acc
    return {"id": f"r{gen}-{acc}-{size}", "genome": {}, "metrics": metrics, "status": status,
            "generation": gen}


def test_headroom_is_the_largest_gain_plus_a_margin_once_enough_are_seen():
    records = [record(0, 0.9, 0.85), record(0, 0.95, 0.94)]
    assert learn_headroom(records) is None
    records.append(record(0, 0.93, 0.80))
    assert learn_headroom(records, margin=0.01) == pytest.approx(0.14)
    # pruned records (their val_accuracy is the rung's) and records without a rung don't count
    records += [record(0, 0.2, 0.2, status=PRUNED), record(0, 0.99)]
    assert learn_headroom(records, margin=0.01) == pytest.approx(0.14)
    # a rung that overestimates never gives a negative headroom
    assert learn_headroom([record(0, 0.8, 0.9)] * 3, margin=0.01) == pytest.approx(0.01)


def test_a_rung_is_built_from_earlier_generations_only():
    records = [record(0, 0.9, 0.85, size=200.0), record(0, 0.95, 0.94, size=300.0),
               record(0, 0.93, 0.80, size=250.0), record(1, 0.99, 0.5, size=10.0)]
    r = rung_for_generation(records=records, generation=1, epochs=1, objectives=OBJECTIVES,
                            baseline=BASELINE, constraints=None)
    assert r.headroom == pytest.approx(0.14)
    assert {m["artifact_bytes"] for m in r.front} == {200.0, 300.0, 250.0}
    fixed = rung_for_generation(records=records, generation=1, epochs=2, objectives=OBJECTIVES,
                                baseline=BASELINE, constraints=None, headroom=0.05)
    assert (fixed.headroom, fixed.epochs) == (0.05, 2)


# --- the Evaluator with a rung (the tiny digits task) --------------------------------------


def genome(sparsity: float, epochs: int) -> dict:
    g = {"quant.scheme": "none", "finetune.epochs": epochs, "finetune.lr": 3e-3}
    for name in DIGITS_CNN_CONVS:
        g[f"layers.{name}.method"] = "l2_channel"
        g[f"layers.{name}.sparsity"] = sparsity
    return g


def test_a_dominated_candidate_stops_at_its_rung_without_an_artifact(evaluator):
    front = ({"val_accuracy": 1.0, "artifact_bytes": 1.0, "latency_ratio": 0.01},)
    result = evaluator.evaluate(genome(0.5, 3), seed=0, rung=rung(front=front))
    assert result.status == PRUNED, result.error
    assert result.artifact is None
    assert result.metrics["fidelity_epochs"] == 1
    assert result.metrics["rung_val_accuracy"] == result.metrics["val_accuracy"]
    assert 0 < result.metrics["size_ratio"] < 1 and result.metrics["latency_ratio"] > 0
    assert "dominated" in result.info["pruned"]


def test_a_survivor_is_measured_in_full_and_records_its_rung(evaluator):
    front = ({"val_accuracy": 0.0, "artifact_bytes": 1e12, "latency_ratio": 100.0},)
    result = evaluator.evaluate(genome(0.5, 3), seed=0, rung=rung(front=front))
    plain = evaluator.evaluate(genome(0.5, 3), seed=0)
    assert result.status == COMPLETE and result.artifact
    assert result.metrics["fidelity_epochs"] == 3
    assert 0.0 <= result.metrics["rung_val_accuracy"] <= 1.0
    # reading the rung does not change the fine-tune: same weights, same artifact
    assert result.artifact == plain.artifact
    assert result.metrics["val_accuracy"] == plain.metrics["val_accuracy"]


def test_a_bytes_constraint_stops_before_any_fine_tune(evaluator):
    r = rung(front=(), headroom=None, constraints={"max_bytes": 100.0})
    result = evaluator.evaluate(genome(0.5, 3), seed=0, rung=r)
    assert result.status == PRUNED and result.metrics["fidelity_epochs"] == 0
    assert "val_accuracy" not in result.metrics
    assert "constraints" in result.info["pruned"]


def test_a_short_fine_tune_has_no_rung(evaluator):
    front = ({"val_accuracy": 1.0, "artifact_bytes": 1.0, "latency_ratio": 0.01},)
    result = evaluator.evaluate(genome(0.5, 1), seed=0, rung=rung(front=front))
    assert result.status == COMPLETE and "rung_val_accuracy" not in result.metrics
    assert math.isfinite(result.metrics["val_accuracy"])
