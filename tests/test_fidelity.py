"""Multi-fidelity: the rung's decisions, the learned headroom, and pruned candidates."""

from __future__ import annotations

import math

import pytest

from petra.candidate.evaluate import COMPLETE, PRUNED
from petra.engine.fidelity import Rung, rung_evidence, rung_for_generation
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
    assert "dominated" in rung().stop_reason(probe(0.80, 150.0, 0.40), "rung")


def test_the_headroom_can_lift_a_candidate_onto_the_front():
    # 0.89 + 0.02 = 0.91 beats the second member's 0.90 at the same size (and a latency that
    # is worse even with its 5% slack)
    assert rung().stop_reason(probe(0.89, 100.0, 0.33), "rung") is None
    assert rung(headroom=0.0).stop_reason(probe(0.89, 100.0, 0.33), "rung") is not None


def test_the_latency_spread_counts_in_the_candidates_favour():
    # at least 5% off the measured ratio: 0.315 could be 0.299, below the member's 0.3
    assert rung(headroom=0.0).stop_reason(probe(0.90, 100.0, 0.315), "rung") is None
    assert rung(headroom=0.0).stop_reason(probe(0.90, 100.0, 0.33), "rung") is not None
    # a wider measured spread widens it: 0.33 with an IQR of 0.05 could be 0.28
    assert rung(headroom=0.0).stop_reason(probe(0.90, 100.0, 0.33, iqr=0.05), "rung") is None


def test_the_measurement_stop_judges_the_exact_accuracy():
    # after the fine-tune the accuracy is exact: no headroom, only the latency's slack
    r = rung(headroom=None, evidence=())
    assert "measured: dominated" in r.stop_reason(probe(0.89, 100.0, 0.35), "measured")
    assert r.stop_reason(probe(0.91, 100.0, 0.35), "measured") is None


def test_no_accuracy_stop_until_enough_evidence_and_none_without_a_front():
    assert rung(headroom=None).stop_reason(probe(0.10, 900.0, 0.99), "rung") is None
    assert rung(front=()).stop_reason(probe(0.10, 900.0, 0.99), "rung") is None
    assert rung(front=()).stop_reason(probe(0.10, 900.0, 0.99), "measured") is None


def test_bytes_and_latency_constraints_stop_at_the_probe():
    r = rung(headroom=None, constraints={"max_bytes": 500.0, "max_latency_ratio": None,
                                         "max_accuracy_drop": 0.01})
    no_accuracy = {k: v for k, v in probe(0.0, 600.0, 0.5).items() if k != "val_accuracy"}
    assert "probe: cannot meet" in r.stop_reason(no_accuracy, "probe")
    # the accuracy constraint is not judged before the fine-tune, nor without evidence
    assert r.stop_reason({**no_accuracy, "artifact_bytes": 400.0}, "probe") is None
    assert r.stop_reason(probe(0.0, 400.0, 0.5), "rung") is None
    # but it is at the measurement, where the accuracy is exact
    assert "measured: cannot meet" in r.stop_reason(probe(0.0, 400.0, 0.5), "measured")


def test_the_accuracy_constraint_is_judged_with_the_headroom():
    r = rung(front=(), constraints={"max_accuracy_drop": 0.05})  # floor 0.90
    assert r.stop_reason(probe(0.87, 400.0, 0.5), "rung") is not None  # 0.89 < 0.90
    assert r.stop_reason(probe(0.89, 400.0, 0.5), "rung") is None  # 0.91 >= 0.90


def test_an_unknown_stage_is_an_error():
    with pytest.raises(ValueError, match="stage must be one of"):
        rung().stop_reason(probe(0.9, 1.0, 0.1), "final")


def test_the_learned_bound_follows_survivors_with_no_better_rung():
    evidence = ((0.10, 0.80), (0.12, 0.82), (0.11, 0.79), (0.40, 0.97), (0.50, 0.98))
    r = rung(headroom=None, evidence=evidence)
    # three survivors had a rung no better than 0.11 + 0.02: the best of them reached 0.82
    assert r.final_accuracy_bound(0.11) == pytest.approx(0.83)
    # above them the support grows to include the 0.97 and 0.98 finals
    assert r.final_accuracy_bound(0.45) == pytest.approx(0.98)
    # with too few survivors at or below its rung: the largest gain anyone made (0.70)
    assert r.final_accuracy_bound(0.05) == pytest.approx(0.05 + 0.70 + 0.01)
    # never below the rung's own accuracy
    assert r.final_accuracy_bound(0.99) == pytest.approx(1.0)
    assert rung(headroom=None, evidence=evidence[:2]).final_accuracy_bound(0.5) is None
    assert rung(headroom=0.05, evidence=()).final_accuracy_bound(0.5) == pytest.approx(0.55)


def record(gen, acc, rung_acc=None, status=COMPLETE, size=100.0, epochs=3, fidelity=3):
    metrics = {"val_accuracy": acc, "artifact_bytes": size, "latency_ratio": 0.5,
               "fidelity_epochs": float(fidelity)}
    if rung_acc is not None:
        metrics["rung_val_accuracy"] = rung_acc
    return {"id": f"r{gen}-{acc}-{size}", "genome": {"finetune.epochs": epochs},
            "metrics": metrics, "status": status, "generation": gen}


def test_evidence_comes_from_candidates_that_finished_their_fine_tune():
    records = [record(0, 0.9, 0.85), record(0, 0.99),  # no rung: no evidence
               record(0, 0.2, 0.2, status=PRUNED, fidelity=1),  # stopped at its rung
               record(0, 0.7, 0.3, status=PRUNED, fidelity=3)]  # stopped at the measurement
    assert rung_evidence(records) == ((0.85, 0.9), (0.3, 0.7))


def test_a_rung_is_built_from_earlier_generations_only():
    records = [record(0, 0.9, 0.85, size=200.0), record(0, 0.95, 0.94, size=300.0),
               record(0, 0.93, 0.80, size=250.0), record(1, 0.99, 0.5, size=10.0)]
    r = rung_for_generation(records=records, generation=1, epochs=1, objectives=OBJECTIVES,
                            baseline=BASELINE, constraints=None)
    assert r.headroom is None and len(r.evidence) == 3
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
    assert result.metrics["latency_rounds"] == 3  # the probe's
    assert result.info["pruned"].startswith("rung: dominated")
    assert result.info["tier"] == 1  # stopped after its short fine-tune


def test_a_survivor_is_measured_in_full_and_records_its_rung(evaluator):
    front = ({"val_accuracy": 0.0, "artifact_bytes": 1e12, "latency_ratio": 100.0},)
    result = evaluator.evaluate(genome(0.5, 3), seed=0, rung=rung(front=front))
    plain = evaluator.evaluate(genome(0.5, 3), seed=0)
    assert result.status == COMPLETE and result.artifact
    assert result.metrics["fidelity_epochs"] == 3 and result.metrics["latency_rounds"] == 15
    assert 0.0 <= result.metrics["rung_val_accuracy"] <= 1.0
    # reading the rung does not change the fine-tune: same weights, same artifact
    assert result.artifact == plain.artifact
    assert result.metrics["val_accuracy"] == plain.metrics["val_accuracy"]


def test_a_bytes_constraint_stops_before_any_fine_tune(evaluator):
    r = rung(front=(), headroom=None, constraints={"max_bytes": 100.0})
    result = evaluator.evaluate(genome(0.5, 3), seed=0, rung=r)
    assert result.status == PRUNED and result.metrics["fidelity_epochs"] == 0
    assert "val_accuracy" not in result.metrics
    assert result.info["pruned"].startswith("probe: cannot meet the constraints")
    assert result.info["tier"] == 1


def test_a_short_fine_tune_has_no_rung_but_its_measurement_can_stop(evaluator):
    front = ({"val_accuracy": 1.0, "artifact_bytes": 1.0, "latency_ratio": 0.01},)
    result = evaluator.evaluate(genome(0.5, 1), seed=0, rung=rung(front=front))
    assert result.status == PRUNED and "rung_val_accuracy" not in result.metrics
    assert result.info["pruned"].startswith("measured: dominated")
    assert result.info["tier"] == 2  # fine-tuned in full, its latency cut short
    # the fine-tune ran in full; the latency stopped after its first rounds
    assert result.metrics["fidelity_epochs"] == 1
    assert result.metrics["latency_rounds"] == 4
    assert math.isfinite(result.metrics["val_accuracy"]) and result.artifact is None


def test_without_a_front_the_measurement_runs_all_its_rounds(evaluator):
    result = evaluator.evaluate(genome(0.5, 1), seed=0, rung=rung(front=()))
    assert result.status == COMPLETE and result.metrics["latency_rounds"] == 15
