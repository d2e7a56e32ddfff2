"""The rank arithmetic of benchmarks/ranks.py, and search_at_scale.py's summary of its runs."""

from __future__ import annotations

import math

import pytest

from tests.conftest import benchmark

sas = benchmark("search_at_scale")
average_ranks, spearman = benchmark("ranks").average_ranks, benchmark("ranks").spearman


def test_ties_share_the_mean_of_their_ranks():
    assert list(average_ranks([0.9, 1.0, 1.0, 0.5, 1.0])) == [1.0, 3.0, 3.0, 0.0, 3.0]


def test_spearman_does_not_depend_on_the_order_of_tied_values():
    # val accuracies tie at 1.0; ranking ties by input order made rho depend on that order
    proxy = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    val = [1.0, 1.0, 1.0, 0.99, 0.98, 0.97]
    forward = spearman(proxy, val)
    backward = spearman(proxy[::-1], val[::-1])
    assert forward == pytest.approx(backward)
    assert forward == pytest.approx(-0.9411, abs=1e-4)  # scipy.stats.spearmanr gives -0.9411


def test_spearman_limits():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="3 values against 2"):
        spearman([1, 2, 3], [1, 2])


def _run(racing, seed, hv, rho=math.nan):
    return {"racing": racing, "seed": seed, "hypervolume": hv, "search_wall_s": 100.0,
            "screened_per_hour": 1000.0 if racing else 0.0, "fully_evaluated_per_hour": 50.0,
            "front_members_without_tier2": 0, "spearman_tier0_vs_val": rho,
            "spearman_predicted_vs_val": rho, "latency_model_median_rel_error": 0.05,
            "one_call_int8_dynamic": {"val_accuracy": 0.9, "size_ratio": 0.25,
                                      "latency_ratio": 0.4},
            "dominated_by_front": True}


def test_summary_pairs_racing_with_no_racing_per_seed():
    rows = [_run(False, 100, 0.10), _run(True, 100, 0.12, 0.5),
            _run(False, 101, 0.20), _run(True, 101, 0.18, 0.7)]
    out = sas.summarize(rows)
    assert out["hypervolume_ratio"] == pytest.approx((1.2 + 0.9) / 2)
    assert out["spread"]["hypervolume_ratio"] == pytest.approx([0.9, 1.2])
    assert out["spearman_tier0_vs_val"] == pytest.approx(0.6)
    assert out["hypervolume_equal_wallclock"] == pytest.approx({"racing": 0.15,
                                                                 "no_racing": 0.15})


def test_the_reference_is_dominated_only_by_a_member_at_least_as_good_everywhere():
    ref = {"val_accuracy": 0.95, "size_ratio": 0.26, "latency_ratio": 0.41}
    better = {"val_accuracy": 0.96, "size_ratio": 0.05, "latency_ratio": 0.2}
    smaller_but_worse = {"val_accuracy": 0.94, "size_ratio": 0.05, "latency_ratio": 0.2}
    assert sas.dominates([better], ref)
    assert not sas.dominates([smaller_but_worse], ref)
    assert not sas.dominates([dict(ref)], ref)


vr = benchmark("val_repeatability")


def _row(val, again, divergence, predicted=None):
    return {"val": val, "val_again": again, "tier0_divergence": divergence,
            "predicted_val": predicted}


def test_the_repeatability_ceiling_is_the_rank_agreement_of_two_measurements():
    rows = [_row(0.90, 0.91, 0.5, 0.90), _row(0.95, 0.985, 0.3, 0.94),
            _row(0.99, 0.99, 0.1, 0.97), _row(0.97, 0.98, 0.2, None),
            _row(0.80, None, 0.9, 0.85)]  # its second evaluation failed: left out
    out = vr.correlations(rows)
    assert out["candidates"] == 4 and out["predicted"] == 3
    assert out["spearman_val_repeat"] == pytest.approx(0.8)  # one swap in four
    assert out["spearman_tier0_vs_val"] == pytest.approx(1.0)  # negated divergence
    assert out["spearman_tier0_vs_val_again"] == pytest.approx(0.8)
    assert out["median_abs_val_change"] == pytest.approx(0.01)


def test_merged_seeds_are_summarized_with_their_spread(tmp_path):
    def seed(s, rho):
        return {"seed": s, "candidates": 10, "spearman_val_repeat": rho, "rows": []}

    out = tmp_path / "r.json"
    vr.write(out, {"task": "t", "seeds": [seed(100, 0.4), seed(101, 0.8)]})
    summary = __import__("json").loads(out.read_text())["summary"]
    assert summary["spearman_val_repeat"] == pytest.approx(0.6)
    assert summary["spread"]["spearman_val_repeat"] == [0.4, 0.8]
