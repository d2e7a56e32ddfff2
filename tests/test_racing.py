"""Racing (petra.engine.racing): tier-0 screening, the calibration that maps it to measured
objectives, and a real search with racing on, whose front holds only measured candidates."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import yaml

from petra.engine.racing import (
    MIN_OBSERVED,
    Calibration,
    screen_count,
    survivors,
    table_latency,
)
from petra.errors import COMPLETE, PRUNED
from tests.conftest import TINY_TASK
from tests.test_search_integration import read_runs, run_cli


def reading(divergence: float, size: float, macs: float) -> dict[str, float]:
    return {"tier0_divergence": divergence, "tier0_size_ratio": size, "tier0_macs_ratio": macs}


def test_the_calibration_learns_a_latency_power_law_and_a_size_factor():
    cal = Calibration()
    for i in range(10):
        macs = 0.1 + 0.08 * i
        cal.observe({"quant.scheme": "int8_static", "finetune.epochs": i % 3},
                    reading(0.1 * i, 0.5 * macs, macs),
                    {"val_accuracy": 1 - 0.05 * i, "size_ratio": 0.55 * macs,
                     "latency_ratio": 0.8 * macs ** 0.6})
    assert cal.ready
    guess = cal.predict({"quant.scheme": "int8_static", "finetune.epochs": 1},
                        reading(0.35, 0.25, 0.5))
    assert guess["latency_ratio"] == pytest.approx(0.8 * 0.5 ** 0.6)
    assert guess["size_ratio"] == pytest.approx(0.25 * 1.1)
    assert 0.7 < guess["val_accuracy"] < 0.95  # between its neighbours'
    errors = cal.errors()
    assert errors["latency_ratio"] == pytest.approx(0.01)  # exact fit: the floor
    assert errors["val_accuracy"] > 0.01


def test_incomplete_measurements_teach_nothing():
    cal = Calibration()
    cal.observe({}, reading(0.1, 0.5, 0.5), {"val_accuracy": math.nan, "size_ratio": 0.5,
                                              "latency_ratio": 0.5})
    assert cal.observed == [] and not cal.ready


def test_survivors_drop_what_the_front_dominates_and_cap_the_rest():
    front = [{"val_accuracy": 0.95, "size_ratio": 0.2, "latency_ratio": 0.3}]
    errors = {"val_accuracy": 0.01, "size_ratio": 0.1, "latency_ratio": 0.1}
    predictions = [
        {"val_accuracy": 0.90, "size_ratio": 0.5, "latency_ratio": 0.6},   # dominated
        {"val_accuracy": 0.97, "size_ratio": 0.5, "latency_ratio": 0.6},   # more accurate
        {"val_accuracy": 0.90, "size_ratio": 0.1, "latency_ratio": 0.6},   # smaller
        {"val_accuracy": 0.945, "size_ratio": 0.21, "latency_ratio": 0.31},  # within error
        {"val_accuracy": 0.96, "size_ratio": 0.6, "latency_ratio": 0.7},   # dominated by 1
    ]
    kept, reasons = survivors(predictions, front, errors, keep=5)
    assert kept == [1, 2, 3, 4] and "dominated by the front" in reasons[0]
    kept, reasons = survivors(predictions, front, errors, keep=2)
    assert len(kept) == 2 and 4 not in kept  # the 1st rank goes first
    assert all("not among the 2 best" in reasons[i] for i in set(range(1, 5)) - set(kept))
    # only the search's objectives count: without size, the smaller one is dominated too
    kept, reasons = survivors(predictions, front, errors, keep=5,
                              objectives=[("val_accuracy", "max"), ("latency_ms", "min")])
    assert kept == [1, 3, 4] and 2 in reasons
    # an objective racing cannot predict: nothing is screened out by the front
    kept, _ = survivors(predictions, front, errors, keep=5,
                        objectives=[("val_accuracy", "max"), ("params", "min")])
    assert kept == [1, 4, 3, 0, 2]  # all of them, the best predicted accuracy first


def test_the_hypervolume_selection_spreads_the_candidates_kept_over_the_front():
    """With a hypervolume reference, the kept candidates are those whose optimistic predictions
    add the most hypervolume, each counted after those taken before it: of three predicted at
    one spot and one elsewhere, the one elsewhere goes second; a prediction below the
    reference's accuracy adds nothing and goes last."""
    front = [{"val_accuracy": 0.95, "size_ratio": 0.5, "latency_ratio": 0.5}]
    errors = {"val_accuracy": 0.0, "size_ratio": 0.0, "latency_ratio": 0.0}
    reference = (-(1.0 - 0.1), 1.0, 1.0)  # pareto.reference_point for a baseline at 1.0
    predictions = [
        {"val_accuracy": 0.80, "size_ratio": 0.01, "latency_ratio": 0.01},  # below the ref
        {"val_accuracy": 0.97, "size_ratio": 0.2, "latency_ratio": 0.2},    # a spot ...
        {"val_accuracy": 0.97, "size_ratio": 0.21, "latency_ratio": 0.2},   # ... the same
        {"val_accuracy": 0.97, "size_ratio": 0.2, "latency_ratio": 0.21},   # ... the same
        {"val_accuracy": 0.99, "size_ratio": 0.45, "latency_ratio": 0.45},  # elsewhere
    ]
    kept, reasons = survivors(predictions, front, errors, keep=2, reference=reference)
    assert kept == [1, 4] and {0, 2, 3} == set(reasons)
    # in non-dominated order (no reference), input order breaks the ties of the first rank
    kept, _ = survivors(predictions, front, errors, keep=2)
    assert kept == [0, 1]
    # nothing adds hypervolume: the rank order decides
    tiny = [{"val_accuracy": 0.5, "size_ratio": 0.9, "latency_ratio": 0.9 - 0.1 * i}
            for i in range(3)]
    kept, _ = survivors(tiny, [], errors, keep=1, reference=reference)
    assert kept == [2]
    # the kept go best first, so that a generation the budget cuts short measures its best
    kept, _ = survivors(tiny, [], errors, keep=2, reference=reference)
    assert kept == [2, 1]


def racing_search(tmp_path, name: str, seed: int, pruning: list[str], generations: int,
                  racing: dict) -> tuple[Any, list[Any]]:
    """A search of the tiny task with racing on (``racing``: the rest of ``search.racing``),
    one local worker, population 4: the CLI's process and the search's child runs."""
    config = {
        "name": name, "seed": seed, "task": TINY_TASK,
        "space": {"pruning": pruning, "sparsity": [0.0, 0.8],
                  "layers": {"exclude": ["fc"]}, "quantization": ["none", "int8_static"],
                  "finetune": {"epochs": [0, 1]}},
        "search": {"strategy": "nsga2", "population": 4, "generations": generations,
                   "racing": {"enabled": True, "factor": 3, **racing}},
        "execution": {"executor": "local", "workers": 1, "cpus_per_candidate": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": name},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli("search", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, read_runs(tmp_path, name)[2]


def test_a_racing_search_measures_every_front_member(tmp_path):
    """Racing on (keeping candidates by predicted hypervolume gain): the later generations
    screen three times the population at tier 0; the screened-out candidates are child runs
    tagged petra.tier=0 with their reading and reason, and every front member was measured in
    full (tier 2)."""
    proc, children = racing_search(tmp_path, "racing", 5, ["none", "magnitude", "l2_channel"],
                                   4, {"screen_share": None, "select": "hypervolume"})
    screened = [c for c in children if c.data.tags["petra.tier"] == "0"]
    measured = [c for c in children if c.data.tags["petra.tier"] == "2"]
    assert len(measured) >= MIN_OBSERVED and screened
    assert len(screened) + len(measured) == len(children)
    for run in screened:
        assert run.data.tags["petra.status"] == "pruned"
        assert run.data.tags["petra.pruned_reason"].startswith("tier 0")
        assert "tier0_divergence" in run.data.metrics and "latency_ms" not in run.data.metrics
        assert run.data.tags["petra.worker_pid"].isdigit()  # which worker screened it
    front = [c for c in children if c.data.tags["petra.on_front"] == "true"]
    assert front
    for run in front:
        assert run.data.tags["petra.tier"] == "2"
        assert {"val_accuracy", "artifact_bytes", "latency_ms", "latency_ratio",
                "tier0_divergence", "tier0_latency_ratio"} <= set(run.data.metrics)
    # screen_share null: every later generation screens factor x population offspring
    later = [c for c in children if c.data.tags["petra.generation"] != "0"]
    assert len(later) > 4 * 3
    # measured after the calibration was ready, a candidate carries what it was predicted to be
    assert any("tier0_predicted_latency_ratio" in r.data.metrics for r in measured)
    assert "racing:" in proc.stdout


@pytest.mark.slow  # a racing search of several generations (~40 s): in make test's second run
def test_a_racing_search_screens_what_its_screen_share_affords(tmp_path):
    """With a screen share far below what one screen costs against one evaluation, every
    generation after the first screens only a population's worth of offspring (with
    screen_share null it screens factor x population: the test above). Candidates are kept in
    rank order here, so the loop runs both selections."""
    _proc, children = racing_search(tmp_path, "share", 6, ["none", "l2_channel"], 3,
                                    {"screen_share": 0.001, "select": "rank"})
    per_generation = {g: sum(c.data.tags["petra.generation"] == str(g) for c in children)
                      for g in (1, 2)}
    assert all(1 <= n <= 4 for n in per_generation.values()), per_generation


def timed(status: str, **metrics: float) -> dict:
    return {"status": status, "metrics": metrics}


def screens(*args, **kwargs) -> int:
    count, measured = screen_count(*args, **kwargs)
    assert measured == kwargs["population"]  # no budget: the whole population is measured
    return count


def test_the_screen_count_is_what_screening_may_cost_against_measuring():
    measured = [timed(COMPLETE, eval_time_s=t, latency_ms=1.0, tier0_time_s=0.2)
                for t in (3.0, 4.0, 5.0)]
    screened = [timed(PRUNED, tier0_time_s=t) for t in (0.1, 0.2, 0.2, 0.3)]
    records = measured + screened
    # median screen 0.2 s of 7, median evaluation 4 s: 0.25 x 16 x 4 / 0.2 = 80 screens
    assert screens(records, population=16, factor=16, share=0.25) == 80
    assert screens(records, population=16, factor=4, share=0.25) == 64  # factor caps it
    assert screens(records, population=16, factor=16, share=0.01) == 16  # never < population
    assert screens(records, population=16, factor=16, share=None) == 256
    # no times yet (or only screens, or only failed evaluations): factor x population
    assert screens([], population=16, factor=16, share=0.25) == 256
    assert screens(screened, population=16, factor=16, share=0.25) == 256
    failed = [timed("failed", eval_time_s=30.0, tier0_time_s=0.2)]
    assert screens(failed + screened, population=16, factor=16, share=0.25) == 256


def test_the_latency_table_s_first_timings_do_not_count_against_screening():
    measured = [timed(COMPLETE, eval_time_s=4.0, latency_ms=1.0, tier0_time_s=0.3,
                      tier0_table_s=0.25) for _ in range(3)]
    cold = [timed(PRUNED, tier0_time_s=0.3, tier0_table_s=0.25) for _ in range(4)]
    # what a screen costs once its shapes are timed: 0.05 s; 0.25 x 16 x 4 / 0.05 = 320
    assert screens(measured + cold, population=16, factor=16, share=0.25) == 256
    assert screens(measured + cold, population=16, factor=4, share=0.1) == 64
    assert screens(measured + cold, population=16, factor=16, share=0.05) == 64
    warm = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "tier0_table_s"}}
            for r in measured + cold]  # no table times recorded: the whole screen counts
    assert screens(warm, population=16, factor=16, share=0.05) == 16


def test_the_budget_s_last_generation_measures_only_what_the_time_left_affords():
    measured = [timed(COMPLETE, eval_time_s=4.0, latency_ms=1.0, tier0_time_s=0.05)
                for _ in range(3)]
    # 10.5 s left on 2 workers, an evaluation 4 s plus a quarter for its screening: 4 measured,
    # and 0.25 x 4 x 4 / 0.05 = 80 screened
    soon = time.monotonic() + 10.5
    assert screen_count(measured, 16, 16, 0.25, deadline=soon, workers=2) == (80, 4)
    assert screen_count(measured, 16, 16, None, deadline=soon, workers=2) == (256, 5)
    # time for a whole generation: the population; past the deadline: one per worker, so that
    # none waits while the generation runs (never more than the population)
    assert screen_count(measured, 16, 16, 0.25, time.monotonic() + 1e4, 2) == (256, 16)
    assert screen_count(measured, 16, 16, 0.25, time.monotonic() - 1.0, 2) == (40, 2)
    assert screen_count(measured, 16, 16, 0.25, time.monotonic() - 1.0, 1) == (20, 1)
    assert screen_count(measured, 2, 16, 0.25, time.monotonic() - 1.0, 4) == (32, 2)
    # no evaluation timed yet: nothing to size by
    assert screen_count([], 16, 16, 0.25, soon, 2) == (256, 16)


def test_the_latency_table_is_corrected_per_scheme_once_two_are_measured():
    cal = Calibration()
    for i in range(MIN_OBSERVED):
        table = 0.2 + 0.05 * i
        scheme = "int8_dynamic" if i % 2 else "none"
        factor = 1.5 if scheme == "int8_dynamic" else 1.0
        cal.observe({"quant.scheme": scheme}, {**reading(0.1, 0.5, 0.9),
                                               "tier0_latency_ratio": table},
                    {"val_accuracy": 0.9, "size_ratio": 0.5, "latency_ratio": factor * table})
    seen = {**reading(0.1, 0.5, 0.9), "tier0_latency_ratio": 0.3}
    assert cal.predict({"quant.scheme": "int8_dynamic"}, seen)["latency_ratio"] == \
        pytest.approx(0.45)
    assert cal.predict({"quant.scheme": "none"}, seen)["latency_ratio"] == pytest.approx(0.3)
    # a scheme not measured yet: the table as it is, not another scheme's correction
    assert cal.predict({"quant.scheme": "fp16"}, seen)["latency_ratio"] == pytest.approx(0.3)
    # no table (a layer could not be timed alone): the MACs model of the measured candidates
    unseen = {**reading(0.1, 0.5, 0.9), "tier0_latency_ratio": math.nan}
    assert math.isfinite(cal.predict({"quant.scheme": "none"}, unseen)["latency_ratio"])


def test_the_table_correction_fits_what_a_ratio_scales_away_once_it_has_enough_candidates():
    # measured = 0.02 (the runtime's cost per call, small ops) + 1.5 * table
    seen = [("int8", t, 0.02 + 1.5 * t) for t in (0.01, 0.1, 0.3, 0.5)]
    assert table_latency(seen[:1], "int8", 0.2, "affine", 3) == 0.2  # too few: the table
    ratio = table_latency(seen[:2], "int8", 0.2, "affine", 3)  # the median ratio
    assert ratio == pytest.approx(0.2 * (3.5 + 1.7) / 2)
    assert table_latency(seen, "int8", 0.2, "ratio", 3) == pytest.approx(
        0.2 * (1.7 + 1.5667) / 2, rel=1e-3)
    assert table_latency(seen, "int8", 0.2, "affine", 3) == pytest.approx(0.32)
    # a near-empty candidate: a ratio alone scales the fixed cost away
    assert table_latency(seen, "int8", 0.001, "affine", 3) == pytest.approx(0.0215)
    assert table_latency(seen, "int8", 0.001, "ratio", 3) < 0.01
    # another scheme's candidates are no evidence for this one's
    assert table_latency(seen, "fp16", 0.2, "affine", 3) == 0.2
    # pairs that show no fixed cost (a < 0 fits best) keep the line through the origin
    slower = [("int8", t, 1.5 * t - 0.01) for t in (0.1, 0.3, 0.5, 0.7)]
    assert 1.3 < table_latency(slower, "int8", 1.0, "affine", 3) < 1.5
    # measured = 2 * table ** 0.8: the power form recovers it, and extrapolates to small tables
    curved = [("int8", t, 2 * t ** 0.8) for t in (0.02, 0.05, 0.2, 0.4)]
    assert table_latency(curved, "int8", 0.002, "power", 3) == pytest.approx(2 * 0.002 ** 0.8)
    assert table_latency(curved, "int8", 0.002, "ratio", 3) < 0.5 * 2 * 0.002 ** 0.8
    # every pair at one table reading shows no slope: the ratio
    flat = [("int8", 0.1, 0.2), ("int8", 0.1, 0.22), ("int8", 0.1, 0.21)]
    assert table_latency(flat, "int8", 0.05, "power", 3) == pytest.approx(0.05 * 2.1)


def test_the_shared_form_learns_one_fixed_cost_from_every_scheme():
    # the runtime's fixed cost (0.005) is the same whatever the scheme; the slopes are not
    seen = [("int4", t, 0.005 + 1.2 * t) for t in (0.01, 0.05, 0.1)] + \
        [("none", t, 0.005 + 1.1 * t) for t in (0.2, 0.3)]
    # "none" holds no small candidate to show the fixed cost; with int4's it is exact
    assert table_latency(seen, "none", 0.001, "shared", 2) == pytest.approx(0.0061)
    assert table_latency(seen, "int4", 0.2, "shared", 2) == pytest.approx(0.245)
