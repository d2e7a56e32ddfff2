"""The arithmetic of benchmarks/front_quality.py: operating points picked on validation, the
hypervolume reference, hypervolume at equal wall-clock, goals and the merge's provenance check."""

from __future__ import annotations

import json

import pytest

from petra.engine import pareto
from petra.engine.operating_points import eligible, operating_points
from tests.conftest import benchmark

fq = benchmark("front_quality")

BASELINE = {"val_accuracy": 0.95, "test_accuracy": 0.96}


def member(i, val, size, latency, test):
    return {"id": f"m{i}", "val_accuracy": val, "size_ratio": size, "latency_ratio": latency,
            "test_accuracy": test}


FRONT = [
    member(0, 0.96, 0.50, 0.50, 0.90),  # eligible on val, poor on test: still eligible
    member(1, 0.94, 0.10, 0.40, 0.97),  # at the floor (0.95 - 0.01): eligible
    member(2, 0.93, 0.01, 0.01, 0.99),  # best on test, but below the floor on val: never picked
    member(3, 0.945, 0.30, 0.15, 0.95),
]


def test_eligibility_is_read_on_validation_never_on_test():
    assert [m["id"] for m in eligible(FRONT, BASELINE["val_accuracy"])] == ["m0", "m1", "m3"]


def test_each_operating_point_is_one_member_with_its_test_drop():
    points = operating_points(FRONT, BASELINE)
    assert points["smallest"]["id"] == "m1" and points["fastest"]["id"] == "m3"
    # the knee, scaled over m0, m1, m3: m0 (0, 1, 1), m1 (1, 0, 0.714), m3 (0.75, 0.5, 0)
    assert points["knee"]["id"] == "m3"
    for point in points.values():
        source = next(m for m in FRONT if m["id"] == point["id"])
        assert (point["size_ratio"], point["latency_ratio"]) == (source["size_ratio"],
                                                                 source["latency_ratio"])
        assert point["test_drop"] == pytest.approx(BASELINE["test_accuracy"]
                                                   - source["test_accuracy"])


def test_changing_test_accuracy_changes_no_choice():
    flipped = [{**m, "test_accuracy": 1.0 - m["test_accuracy"]} for m in FRONT]
    ids = {k: v["id"] for k, v in operating_points(FRONT, BASELINE).items()}
    assert {k: v["id"] for k, v in operating_points(flipped, BASELINE).items()} == ids


def test_no_eligible_member_gives_none_and_ties_go_to_the_smaller_other_objective():
    assert operating_points(FRONT[2:3], BASELINE) == dict.fromkeys(("smallest", "fastest", "knee"))
    tied = [member(0, 0.96, 0.2, 0.5, 0.9), member(1, 0.96, 0.2, 0.4, 0.9)]
    assert operating_points(tied, BASELINE)["smallest"]["id"] == "m1"


def test_the_hypervolume_reference_is_baseline_minus_a_tenth_and_the_dense_ratios():
    objectives = [("val_accuracy", "max"), ("size_ratio", "min"), ("latency_ratio", "min")]
    assert pareto.reference_point(objectives, BASELINE) == pytest.approx((-0.85, 1.0, 1.0))
    point = pareto.normalize({"val_accuracy": 0.95, "size_ratio": 0.5, "latency_ratio": 0.5},
                             objectives, BASELINE)
    ref = pareto.reference_point(objectives, BASELINE)
    assert pareto.hypervolume([point], ref) == pytest.approx(0.1 * 0.5 * 0.5)
    worse = pareto.normalize({"val_accuracy": 0.84, "size_ratio": 0.5, "latency_ratio": 0.5},
                             objectives, BASELINE)
    assert pareto.hypervolume([worse], ref) == 0.0  # more than 0.1 below the baseline


def test_hypervolume_at_equal_wallclock_reads_each_curve_at_the_grid_s_time():
    curve = [[10.0, 0.1], [20.0, 0.2], [30.0, 0.3]]
    assert fq.hypervolume_at(curve, 5.0) == 0.0
    assert fq.hypervolume_at(curve, 20.0) == 0.2 and fq.hypervolume_at(curve, 29.9) == 0.2
    runs = {"grid": [{"seed": 100, "anytime": [[5.0, 0.05], [25.0, 0.15]]}],
            "petra": [{"seed": 100, "anytime": curve}]}
    assert fq.equal_wallclock(runs) == {"grid": [0.15], "petra": [0.2]}


def run(seed, hv, curve, knee):
    return {"seed": seed, "hypervolume": hv, "anytime": curve, "wall_s": curve[-1][0],
            "evaluations_to_95": 4, "evaluations": 8, "baseline_test_accuracy": 0.96,
            "baseline_val_accuracy": 0.95, "front": [],
            "points": {"knee": knee, "smallest": knee, "fastest": knee}}


def test_goals_use_petra_s_validation_knee_and_equal_wallclock_hypervolume():
    knee = {"size_ratio": 0.08, "latency_ratio": 0.3, "val_accuracy": 0.95,
            "test_accuracy": 0.955, "test_drop": 0.005}
    runs = {"petra": [run(100, 0.3, [[10.0, 0.2], [40.0, 0.3]], knee)],
            "grid": [run(100, 0.25, [[20.0, 0.25]], None)],
            "random": [run(100, 0.1, [[20.0, 0.1]], None)]}
    summary = fq.summarise("digits_cnn", runs)
    assert summary["arms"]["petra"]["hypervolume_equal_wallclock"] == 0.2  # at the grid's 20 s
    assert summary["arms"]["petra"]["hypervolume_equal_evaluations"] == 0.3
    goals = summary["goals"]
    assert goals["headline_size"]["met"] and goals["knee_test_drop"]["met"]
    assert goals["size"]["met"] and not goals["latency"]["met"]  # 0.3 > 0.20
    assert goals["hv_wallclock_vs_grid"]["measured"] == pytest.approx(0.2 / 0.25)
    assert not goals["hv_wallclock_vs_grid"]["met"] and goals["hv_wallclock_vs_random"]["met"]
    assert summary["arms"]["grid"]["knee"]["found"] == 0


def test_per_seed_ratios_pair_each_seed_and_leave_a_missing_arm_empty():
    runs = {"petra": [run(100, 0.3, [[10.0, 0.2]], None), run(101, 0.3, [[10.0, 0.3]], None)],
            "grid": [run(100, 0.2, [[20.0, 0.25]], None), run(101, 0.2, [[20.0, 0.2]], None)],
            "random": [run(101, 0.1, [[5.0, 0.1], [30.0, 0.6]], None)],
            "petra_racing": [run(100, 0.1, [[10.0, 0.0]], None)]}
    rows = fq.summarise("digits_mlp", runs)["per_seed_wallclock"]
    assert [r["seed"] for r in rows] == [100, 101]
    assert rows[0]["petra_vs_grid"] == pytest.approx(0.8)
    assert rows[1]["petra_vs_grid"] == pytest.approx(1.5)
    assert rows[0]["petra_vs_random"] is None  # random did not run seed 100
    assert rows[1]["petra_vs_random"] == pytest.approx(3.0)  # random read at the grid's 20 s
    assert rows[0]["petra_racing_vs_petra"] == 0.0 and rows[1]["petra_racing_vs_petra"] is None
    results = {"provenance": {"commit": "abc1234"}, "seeds": [100, 101],
               "tasks": {"digits_mlp": fq.summarise("digits_mlp", runs)}}
    assert "| digits_mlp | 101 | 1.500 | 3.000 | — |" in fq.table(results)


def test_merge_refuses_results_of_different_or_dirty_commits():
    from provenance import same_commit

    clean = {"provenance": {"commit": "abc1234", "dirty": False}}
    assert same_commit([clean, clean], ["a", "b"]) == "abc1234"
    with pytest.raises(SystemExit, match="different or unknown code"):
        same_commit([clean, {"provenance": {"commit": "def5678", "dirty": False}}], ["a", "b"])
    with pytest.raises(SystemExit, match="dirty"):
        same_commit([clean, {"provenance": {"commit": "abc1234", "dirty": True}}], ["a", "b"])
    with pytest.raises(SystemExit):
        same_commit([clean, {"command": "no provenance"}], ["a", "b"])


def test_provenance_flags_petra_imported_from_another_checkout(tmp_path, monkeypatch):
    """With an editable install, the scripts of one clone can run the petra of another: the
    run is then not clean, unless that checkout is clean and at the same commit."""
    import subprocess

    import provenance

    other = tmp_path / "other"
    other.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(other)]
    subprocess.run([*git, "init", "-q"], check=True)
    (other / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "other"], check=True)
    monkeypatch.setattr(provenance, "petra_source", lambda: other)
    record = provenance.provenance(["bench.py"])
    assert record["petra_source"] == str(other)
    assert record["dirty"]  # another commit than the scripts'
    monkeypatch.setattr(provenance, "petra_source", lambda: provenance.ROOT)
    assert provenance.provenance(["bench.py"])["petra_source"] == str(provenance.ROOT)


def test_a_merged_result_merges_again_keeping_every_part_s_command(tmp_path):
    """A run done in parts over several sessions: a merge of merges holds every run and the
    commands of all the original parts, and still refuses another commit."""
    knee = {"size_ratio": 0.08, "latency_ratio": 0.3, "val_accuracy": 0.95,
            "test_accuracy": 0.955, "test_drop": 0.005}

    def part(name, arm, commit="abc1234"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({
            "population": 8, "generations": 4, "workers": 2, "reference": {},
            "operating_points": {}, "store": "runs/benchmarks", "seeds": [100], "wall_s": 40.0,
            "provenance": {"commit": commit, "dirty": False, "command": f"run {name}",
                           "date": "2026-12-03"},
            "runs": {"digits_cnn": {arm: [run(100, 0.3, [[10.0, 0.2], [40.0, 0.3]], knee)]}}}))
        return path

    first = tmp_path / "first.json"
    fq.merge([part("b", "grid"), part("a", "petra")], first, tmp_path)
    both = tmp_path / "both.json"
    fq.merge([first, part("c", "random")], both, tmp_path)
    merged = json.loads(both.read_text())
    assert [m["command"] for m in merged["merged_from"]] == ["run b", "run a", "run c"]
    assert list(merged["runs"]["digits_cnn"]) == ["petra", "grid", "random"]  # the script's order
    assert merged["provenance"]["commit"] == "abc1234" and merged["wall_s"] == 120.0
    with pytest.raises(SystemExit, match="different or unknown code"):
        fq.merge([both, part("d", "grid_full", commit="def5678")], tmp_path / "no.json", tmp_path)
