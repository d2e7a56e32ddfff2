"""The fault scenarios of benchmarks/faults.py, smaller: kills of the driver, a killed Ray
worker, candidates that fail every way, a stopped MLflow server, and two searches at once.
Fewer generations than the benchmark's where the scenario needs no more (3 kills land in the
first 18 candidates; the outage starts after 4), which saves about 3 minutes of CI."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark

pytestmark = [pytest.mark.integration, pytest.mark.slow]

faults = benchmark("faults")


def test_driver_kills_lose_repeat_and_duplicate_nothing(tmp_path):
    report = faults.driver_killed(tmp_path, kills=3, seed=1, search={"generations": 3})
    assert report["kills"] == 3 and report["final_rc"] == 0
    assert report["status"] == "FINISHED"
    assert (report["re_evaluated"], report["lost"], report["duplicated"]) == (0, 0, 0), report
    assert report["same_evaluations_as_uninterrupted"] and report["front_equals_uninterrupted"]
    assert report["children"] == report["reference_children"]


def test_a_killed_worker_s_candidate_is_run_again_and_the_search_completes(tmp_path):
    report = faults.worker_killed(tmp_path)
    assert report["completed"], report


def test_every_candidate_fault_is_recorded_and_the_search_completes(tmp_path):
    report = faults.candidate_faults(tmp_path)
    assert report["completed"], report


def test_an_mlflow_outage_loses_nothing(tmp_path):
    report = faults.mlflow_down(tmp_path, outage_s=8, search={"generations": 3})
    assert report["completed"] and report["saw_the_outage"], report
    assert (report["lost"], report["duplicated"]) == (0, 0)
    assert report["checkpoint_holds_every_child"]
    # MLflow's own "View run ... at: URL" lines (two per candidate) stay out of the output, the
    # outage line keeps urllib3's reason, and the closing hint reads this store, not the default
    assert report["mlflow_url_lines"] == 0 and report["outage_line_whole"], report
    assert report["hint_names_the_store"], report


def test_two_searches_at_once_share_a_store_and_a_cluster(tmp_path):
    report = faults.concurrent(tmp_path, search={"generations": 2})
    assert report["completed"], report
