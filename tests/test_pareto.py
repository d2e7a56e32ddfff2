import csv
import io
import json
import math

import numpy as np
import pytest

from petra.engine.pareto import (
    FrontSnapshot,
    hypervolume,
    is_feasible,
    knee_point,
    non_dominated_ranks,
    normalize,
    reference_point,
    snapshot,
    to_minimization,
)

OBJECTIVES = [("val_accuracy", "max"), ("artifact_bytes", "min"), ("latency_ratio", "min")]
BASELINE = {"val_accuracy": 0.95, "artifact_bytes": 1000.0, "latency_ms": 2.0}


def record(id, acc, nbytes, lat, status="complete", **genome):
    return {
        "id": id,
        "genome": genome or {"quant.scheme": "int8"},
        "metrics": {
            "val_accuracy": acc,
            "artifact_bytes": nbytes,
            "latency_ratio": lat,
            "size_ratio": nbytes / BASELINE["artifact_bytes"],
        },
        "status": status,
    }


def test_ranks_on_a_hand_made_set():
    points = np.array([[1, 5], [2, 3], [3, 1], [2, 4], [4, 4], [5, 5], [2, 3]], dtype=float)
    assert non_dominated_ranks(points).tolist() == [0, 0, 0, 1, 2, 3, 0]


def test_ranks_of_an_empty_set_and_bad_shapes():
    assert non_dominated_ranks(np.empty((0, 2))).tolist() == []
    with pytest.raises(ValueError, match="2-D"):
        non_dominated_ranks(np.array([1.0, 2.0]))


def test_to_minimization_negates_max_objectives():
    values = [{"val_accuracy": 0.9, "artifact_bytes": 10, "latency_ratio": 0.5}]
    assert to_minimization(values, OBJECTIVES).tolist() == [[-0.9, 10.0, 0.5]]


def test_hypervolume_of_known_points():
    points = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # Slices x in [1,2), [2,3), [3,4) have heights 1, 2, 3 under the reference (4, 4).
    assert hypervolume(points, (4.0, 4.0)) == pytest.approx(6.0)
    # A point on the reference's boundary, or beyond it, adds nothing.
    with_outside = np.vstack([points, [[4.0, 0.0], [0.5, 5.0]]])
    assert hypervolume(with_outside, (4.0, 4.0)) == pytest.approx(6.0)
    assert hypervolume(np.array([[5.0, 5.0]]), (4.0, 4.0)) == 0.0
    assert hypervolume(np.empty((0, 2)), (4.0, 4.0)) == 0.0


def test_normalize_and_reference_for_accuracy_bytes_latency():
    metrics = {"val_accuracy": 0.93, "artifact_bytes": 250.0, "latency_ratio": 0.5}
    assert normalize(metrics, OBJECTIVES, BASELINE) == pytest.approx((-0.93, 0.25, 0.5))
    assert reference_point(OBJECTIVES, BASELINE) == pytest.approx((-0.85, 1.0, 1.0))


def test_normalize_divides_absolute_min_metrics_by_the_baseline():
    objectives = [("val_accuracy", "max"), ("latency_ms", "min")]
    assert normalize({"val_accuracy": 0.9, "latency_ms": 1.0}, objectives, BASELINE) == (
        pytest.approx((-0.9, 0.5))
    )
    with pytest.raises(ValueError, match="macs"):
        normalize({"macs": 3.0}, [("macs", "min")], BASELINE)


def test_snapshot_front_counts_and_hypervolume():
    records = [
        record("a", 0.95, 500.0, 0.8),
        record("b", 0.93, 250.0, 0.5),
        record("c", 0.92, 600.0, 0.9),  # dominated by a and b
        record("d", math.nan, 100.0, 0.1),  # non-finite objective
        {"id": "e", "genome": {}, "metrics": {}, "status": "failed"},
        record("f", 0.99, 10.0, 0.1, status="pruned"),
    ]
    front = snapshot(records, OBJECTIVES, BASELINE, generation=3)
    assert front.generation == 3
    assert front.ids == ["a", "b"]  # best-first on accuracy
    assert all(m["rank"] == 0 for m in front.members)
    assert front.evaluated == 6
    assert front.failed == 1
    points = np.array([normalize(records[i]["metrics"], OBJECTIVES, BASELINE) for i in (0, 1)])
    assert front.hypervolume == pytest.approx(hypervolume(points, front.reference))
    assert front.hypervolume > 0


def test_snapshot_hypervolume_of_one_member():
    objectives = OBJECTIVES[:2]
    front = snapshot([record("a", 0.95, 500.0, 0.8)], objectives, BASELINE, generation=0)
    # (-0.95, 0.5) against (-0.85, 1.0): a 0.1 x 0.5 box.
    assert front.hypervolume == pytest.approx(0.05)


def test_infeasible_candidates_never_sit_on_the_front():
    records = [
        record("ok", 0.94, 500.0, 0.8),
        record("small_but_bad", 0.90, 100.0, 0.3),  # drops 0.05 > 0.02
    ]
    unconstrained = snapshot(records, OBJECTIVES, BASELINE, generation=0)
    assert set(unconstrained.ids) == {"ok", "small_but_bad"}
    constrained = snapshot(
        records,
        OBJECTIVES,
        BASELINE,
        generation=0,
        constraints={"max_accuracy_drop": 0.02, "max_bytes": None},
    )
    assert constrained.ids == ["ok"]
    by_bytes = snapshot(records, OBJECTIVES, BASELINE, generation=0, constraints={"max_bytes": 400})
    assert by_bytes.ids == ["small_but_bad"]
    by_latency = snapshot(
        records, OBJECTIVES, BASELINE, generation=0, constraints={"max_latency_ratio": 0.5}
    )
    assert by_latency.ids == ["small_but_bad"]


def test_is_feasible_rejects_unknown_constraints():
    with pytest.raises(ValueError, match="max_acc"):
        is_feasible({}, BASELINE, {"max_acc": 0.1})
    assert is_feasible({"val_accuracy": 0.9}, BASELINE, None)
    assert not is_feasible({}, BASELINE, {"max_latency_ratio": 1.0})


def test_knee_point_on_a_convex_front():
    objectives = [("f1", "min"), ("f2", "min")]
    points = [(0.0, 1.0), (0.1, 0.4), (0.3, 0.15), (0.6, 0.05), (1.0, 0.0)]
    records = [
        {"id": f"p{i}", "genome": {}, "metrics": {"f1": a, "f2": b}, "status": "complete"}
        for i, (a, b) in enumerate(points)
    ]
    front = snapshot(records, objectives, {"f1": 2.0, "f2": 2.0}, generation=0)
    assert len(front.members) == 5
    assert knee_point(front) == "p2"


def test_the_knee_is_within_the_accuracy_margin_where_any_member_is():
    """A front that holds a tiny model of no accuracy offered it as the knee (an outside GPT:
    val 0.0 against 1.0; a seq2seq: 0.06 against 0.88): it is never the knee while a member
    within 0.1 of the baseline's accuracy is, and the knee among those is the one it was."""
    objectives = [("val_accuracy", "max"), ("size_ratio", "min")]
    points = {"dense": (0.95, 0.5), "balanced": (0.9, 0.45), "useless": (0.0, 0.0),
              "low": (0.6, 0.02)}  # over the whole front, "low" is nearest the ideal point
    records = [{"id": k, "genome": {}, "status": "complete",
                "metrics": {"val_accuracy": a, "size_ratio": b}} for k, (a, b) in points.items()]
    front = snapshot(records, objectives, {"val_accuracy": 0.95, "size_ratio": 1.0}, generation=0)
    assert knee_point(front) == "balanced"
    far = snapshot([r for r in records if r["id"] in ("useless", "low")], objectives,
                   {"val_accuracy": 0.95, "size_ratio": 1.0}, generation=0)
    assert knee_point(far) == "low"  # none within the margin: the whole front counts


def test_knee_point_of_an_empty_front_is_none():
    front = snapshot([], OBJECTIVES, BASELINE, generation=0)
    assert knee_point(front) is None
    assert front.hypervolume == 0.0
    assert "empty" in front.table()


def test_json_and_csv_round_trips_keep_the_ids():
    records = [
        record("a", 0.95, 500.0, 0.8, **{"quant.scheme": "fp16", "finetune.lr": 1e-3}),
        record("b", 0.93, 250.0, 0.5, **{"quant.scheme": "int8", "finetune.lr": 2e-3}),
    ]
    front = snapshot(records, OBJECTIVES, BASELINE, generation=2)

    again = FrontSnapshot.from_json(front.to_json())
    assert again.ids == ["a", "b"]
    assert again.objectives == front.objectives
    assert again.hypervolume == pytest.approx(front.hypervolume)
    assert json.loads(front.to_json())["members"][1]["genome"]["quant.scheme"] == "int8"

    rows = list(csv.DictReader(io.StringIO(front.to_csv())))
    assert [r["id"] for r in rows] == ["a", "b"]
    header = front.to_csv().splitlines()[0].split(",")
    assert header[:4] == ["id", "val_accuracy", "artifact_bytes", "latency_ratio"]
    assert "size_ratio" in header
    assert header[-2:] == ["gene:quant.scheme", "gene:finetune.lr"]
    assert float(rows[1]["artifact_bytes"]) == 250.0


def test_table_is_fixed_width_and_truncates():
    records = [record(f"c{i}", 0.95 - i / 100, 100.0 * (10 - i), 0.5) for i in range(5)]
    front = snapshot(records, OBJECTIVES, BASELINE, generation=0)
    lines = front.table(max_rows=3).splitlines()
    assert lines[0].split() == ["id", *(m for m, _ in OBJECTIVES), "size_ratio"]
    assert [line.split()[0] for line in lines[2:5]] == ["c0", "c1", "c2"]
    assert lines[-1] == "... 2 more"
    assert len({len(line) for line in lines[:5]}) == 1


def test_violation_is_zero_when_feasible_and_grows_with_the_excess():
    from petra.engine.pareto import violation

    baseline = {"val_accuracy": 0.9}
    limits = {"max_accuracy_drop": 0.02, "max_bytes": 1000.0, "max_latency_ratio": 0.5}
    ok = {"val_accuracy": 0.89, "artifact_bytes": 900.0, "latency_ratio": 0.4}
    assert violation(ok, baseline, limits) == 0.0
    assert violation(ok, baseline, None) == 0.0
    worse = {"val_accuracy": 0.85, "artifact_bytes": 1500.0, "latency_ratio": 0.75}
    assert violation(worse, baseline, limits) == pytest.approx(0.03 + 0.5 + 0.5)
    assert violation({"val_accuracy": 0.89}, baseline, limits) == float("inf")


def test_constrained_values_follow_debs_rules():
    from petra.engine.pareto import constrained_values, non_dominated_ranks, to_minimization

    objectives = [("val_accuracy", "max"), ("artifact_bytes", "min")]
    baseline = {"val_accuracy": 0.9}
    limits = {"max_accuracy_drop": 0.05}

    def told(acc, size):
        metrics = {"val_accuracy": acc, "artifact_bytes": size}
        return constrained_values((acc, size), objectives, metrics, baseline, limits)

    feasible_poor = told(0.86, 10_000.0)   # feasible, and worse than the infeasible ones
    slightly_off = told(0.84, 10.0)        # violates by 0.01
    far_off = told(0.50, 1.0)              # violates by 0.35
    assert feasible_poor == (0.86, 10_000.0)
    assert told(0.95, 5.0) == (0.95, 5.0)
    points = to_minimization(
        [dict(zip(["val_accuracy", "artifact_bytes"], v, strict=True))
         for v in (feasible_poor, slightly_off, far_off)], objectives)
    ranks = non_dominated_ranks(points)
    assert list(ranks) == [0, 1, 2]  # feasible first, then by violation
    assert constrained_values(None, objectives, {}, baseline, limits) is None


def test_hypervolume_curve_grows_with_each_useful_record_and_counts_only_feasible_ones():
    from petra.engine.pareto import evaluations_to_reach, hypervolume_curve

    objectives = [("val_accuracy", "max"), ("size_ratio", "min")]
    baseline = {"val_accuracy": 0.9}
    records = [
        {"status": "complete", "metrics": {"val_accuracy": 0.85, "size_ratio": 0.5}},
        {"status": "failed", "metrics": {}},
        {"status": "pruned", "metrics": {"val_accuracy": 0.89, "size_ratio": 0.1}},
        {"status": "complete", "metrics": {"val_accuracy": 0.70, "size_ratio": 0.1}},  # worse
        {"status": "complete", "metrics": {"val_accuracy": 0.89, "size_ratio": 0.2}},
    ]
    curve = hypervolume_curve(records, objectives, baseline)
    # (0.85 - 0.8) * (1 - 0.5), then unchanged, then the third point adds its own box
    assert curve[:4] == pytest.approx([0.025] * 4)
    assert curve[4] == pytest.approx(0.09 * 0.8)
    assert evaluations_to_reach(curve, 0.95) == 5 and evaluations_to_reach(curve, 0.3) == 1
    constrained = hypervolume_curve(records, objectives, baseline, {"max_accuracy_drop": 0.02})
    assert constrained == pytest.approx([0.0] * 4 + [0.09 * 0.8])
    assert evaluations_to_reach([0.0, 0.0]) is None
