"""petra.tracking.compare and petra.tracking.plots on hand-made searches: numbers, files and formats."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest

from petra.config import ConfigError, load_config
from petra.engine.pareto import hypervolume, normalize
from petra.tracking.compare import common_reference, compare, write
from petra.tracking.runs import SearchRun

OBJECTIVES = ["val_accuracy:max", "artifact_bytes:min", "latency_ratio:min"]


def candidate(i: int, acc: float, size: float, latency: float, gen: int = 0) -> dict:
    return {"id": f"cand{i:04d}-0000", "generation": gen, "status": "complete",
            "genome": {"quant.scheme": "int8_static", "layers.stem.method": "l2_channel",
                       "layers.stem.sparsity": 0.5},
            "metrics": {"val_accuracy": acc, "artifact_bytes": size * 1000.0,
                        "size_ratio": size, "latency_ratio": latency}}


def search(run_id: str, baseline_acc: float, points, objectives=OBJECTIVES) -> SearchRun:
    cfg = load_config({"name": run_id, "objectives": objectives})
    records = [candidate(i, *p) for i, p in enumerate(points)]
    for r in records:
        r["id"] = f"{run_id}-{r['id']}"
    return SearchRun(uri="sqlite:///unused.db", run_id=run_id * 4, name=run_id,
                     experiment_id="1", status="FINISHED", config=cfg,
                     baseline={"val_accuracy": baseline_acc, "artifact_bytes": 1000.0},
                     records=records)


A = [(0.95, 0.10, 0.30), (0.90, 0.05, 0.25), (0.80, 0.50, 0.90)]  # last one is dominated
B = [(0.96, 0.30, 0.50), (0.89, 0.06, 0.26)]  # the second is dominated by A's second


def test_hypervolumes_use_one_reference_for_all_searches():
    a, b = search("a", 0.97, A), search("b", 0.95, B)
    result = compare([a, b])
    ref = common_reference(a.objectives, [a.baseline, b.baseline])
    assert ref == pytest.approx((-(0.95 - 0.1), 1.0, 1.0))
    for s, label in ((a, result.labels[0]), (b, result.labels[1])):
        front = s.front()
        pts = np.array([normalize(m["metrics"], s.objectives, s.baseline) for m in front.members])
        assert result.hypervolumes[label] == pytest.approx(hypervolume(pts, ref))
    assert len(result.fronts[0].members) == 2  # the dominated third point is off A's front


def test_coverage_combined_front_and_bands():
    result = compare([search("a", 0.97, A), search("b", 0.95, B)])
    la, lb = result.labels
    # A's (0.90, 0.05, 0.25) dominates B's (0.89, 0.06, 0.26); nothing of B dominates A
    assert result.coverage[la][lb] == pytest.approx(0.5)
    assert result.coverage[lb][la] == 0.0
    assert result.combined[la]["points"] == 2 and result.combined[lb]["points"] == 1
    assert result.combined[la]["exclusive_hypervolume"] > 0
    assert result.combined[lb]["exclusive_hypervolume"] > 0  # B's 0.96 is on the combined front
    bands = {tuple(b["size_ratio"]): b for b in result.bands["size_ratio"]}
    assert bands[(0.05, 0.1)]["winner"] == la  # A's 0.90 at 0.05 (B's 0.89 is at 0.06)
    assert bands[(0.2, 0.35)]["winner"] == lb  # only B has a member there
    assert bands[(0.5, 1.0)]["winner"] is None and bands[(0.5, 1.0)]["leaders"] == []


def test_a_band_where_two_fronts_reach_the_same_accuracy_is_a_tie():
    result = compare([search("a", 0.97, [(0.95, 0.6, 0.9)]), search("b", 0.97, [(0.95, 0.7, 0.8)])])
    band = next(b for b in result.bands["size_ratio"] if b["size_ratio"] == [0.5, 1.0])
    assert band["winner"] is None and band["leaders"] == result.labels
    assert "0.9500=" in result.table()


def test_compare_needs_two_searches_with_the_same_objectives():
    with pytest.raises(ConfigError, match="at least two"):
        compare([search("a", 0.97, A)])
    other = search("b", 0.95, B, objectives=["val_accuracy:max", "artifact_bytes:min"])
    with pytest.raises(ConfigError, match="same objectives"):
        compare([search("a", 0.97, A), other])


def test_labels_stay_unique_for_searches_with_the_same_name():
    result = compare([search("a", 0.97, A), search("a", 0.97, B)])
    assert len(set(result.labels)) == 2


def test_write_gives_html_png_csv_markdown_and_json(tmp_path):
    result = compare([search("a", 0.97, A), search("b", 0.95, B)])
    files = write(result, tmp_path / "out")
    assert set(files) == {"html", "png", "csv", "md", "json"}
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    assert len(rows) == 2 + 2  # each search's own front
    assert {r["search"] for r in rows} == set(result.labels)
    assert all(r["recipe"] == "l2_channelx1@0.50 int8_static" for r in rows)
    data = json.loads(files["json"].read_text())
    assert data["hypervolume"] == pytest.approx(result.hypervolumes)
    assert [s["run_id"] for s in data["searches"]] == ["aaaa", "bbbb"]
    md = files["md"].read_text()
    assert md.count("\n| ") == 2 and f"{result.hypervolumes[result.labels[0]]:.4f}" in md
    page = files["html"].read_text()
    for label in result.labels:
        assert label in page
    assert "coverage C(row, column)" in page  # the summary table rides along


def test_the_front_page_is_plotly_self_contained_and_safe():
    from petra.tracking import plots

    s = search("a", 0.97, A)
    snap = s.front()
    snap.members[0]["genome"]["note"] = "</script><b>x</b>"
    page = plots.front_html(snap, s.records, s.baseline)
    # plotly.js is inlined: no script or stylesheet is fetched from anywhere
    assert "Plotly.newPlot" in page and len(page) > 1_000_000
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*\shref=", page)
    assert "<b>x</b>" not in page  # a label cannot close the script or inject markup
    fig = plots.front_figure_3d(plots.front_series(snap, s.records), s.baseline)
    kinds = [(t.type, t.legendgroup) for t in fig.data]
    # one 3-D view and three projections per series, and the dense baseline in each
    assert kinds == [("scatter3d", "evaluated")] + [("scatter", "evaluated")] * 3 + [
        ("scatter3d", "front")] + [("scatter", "front")] * 3 + [
        ("scatter3d", "dense")] + [("scatter", "dense")] * 3
    front = fig.data[4]
    assert set(front.customdata) == set(snap.ids)
    assert list(fig.data[0].customdata) == [r["id"] for r in s.records
                                            if r["id"] not in set(snap.ids)]
    assert list(front.z) == [m["metrics"]["val_accuracy"] for m in snap.members]
    assert fig.data[8].z == (s.baseline["val_accuracy"],)
    # hovering a point shows its recipe and its genes
    assert "l2_channelx1@0.50 int8_static" in front.text[0]
    assert "layers.stem.sparsity = 0.5" in front.text[0]
    # the table of the front members
    for run_id in snap.ids:
        assert f"<td>{run_id[:8]}</td>" in page


def test_the_ui_binds_loopback_and_links_the_runs_table_with_its_filter(tmp_path):
    from petra.tracking.ui import FILTERS, absolute_store, runs_url, server_command

    command = server_command("sqlite:///runs/x.db", 5055)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5055"
    store = command[command.index("--backend-store-uri") + 1]
    assert store.startswith("sqlite:////") and store.endswith("/runs/x.db")
    assert absolute_store("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    url = runs_url("http://127.0.0.1:5055", "3", FILTERS[0])
    assert url == ("http://127.0.0.1:5055/#/experiments/3/runs?workflowType=machine_learning"
                   "&searchFilter=tags.petra.on_front%20%3D%20%22true%22")


def test_every_experiment_carries_the_fronts_view_and_its_link_opens_it(tmp_path):
    """The view MLflow's runs page restores from ``viewStateShareKey``: the fronts only, the
    objectives first among the columns, and scatter charts of metrics a candidate logs."""
    import urllib.parse

    from mlflow.tracking import MlflowClient

    from petra.tracking.store import EXPERIMENT_KIND, MODEL_TRAINING, Tracker
    from petra.tracking.views import FRONTS_VIEW, SHARE_TAG_PREFIX, fronts_url, fronts_view

    view = fronts_view()
    assert view["searchFilter"] == 'tags.petra.on_front = "true"'
    assert view["selectedColumns"][:3] == ["metrics.`val_accuracy`", "metrics.`test_accuracy`",
                                           "metrics.`size_ratio`"]
    assert view["columnOrder"][2:5] == ["duration", "metrics.`val_accuracy`",
                                        "metrics.`test_accuracy`"]
    logged = {"val_accuracy", "size_ratio", "latency_ratio", "test_accuracy", "artifact_bytes",
              "latency_ms"}  # the candidate metrics of DESIGN.md's MLflow layout
    axes = [(c["xaxis"]["key"], c["yaxis"]["key"]) for c in view["compareRunCharts"]]
    assert ("size_ratio", "val_accuracy") in axes and ("latency_ratio", "val_accuracy") in axes
    assert {k for pair in axes for k in pair} <= logged
    assert {c["metricSectionId"] for c in view["compareRunCharts"]} == {
        s["uuid"] for s in view["compareRunSections"]}
    url = fronts_url("http://127.0.0.1:5000", "7")
    query = urllib.parse.parse_qs(url.split("?", 1)[1])
    assert url.startswith("http://127.0.0.1:5000/#/experiments/7/runs?")
    assert query == {"workflowType": ["machine_learning"], "viewStateShareKey": [FRONTS_VIEW],
                     "compareRunsMode": ["CHART"]}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old")  # logged by an older petra: no kind, no view
    for name in ("new", "old"):
        tags = client.get_experiment(Tracker(uri=uri, experiment=name).experiment_id).tags
        assert tags[EXPERIMENT_KIND] == MODEL_TRAINING
        assert json.loads(tags[SHARE_TAG_PREFIX + FRONTS_VIEW]) == view
    assert client.get_experiment_by_name("old").experiment_id == old

    # `petra ui` saves the same view on an experiment whose view is missing or stale
    from petra.tracking.ui import experiments

    stale = client.create_experiment("stale", tags={SHARE_TAG_PREFIX + FRONTS_VIEW: "{}"})
    client.set_terminated(client.create_run(stale, tags={"petra.kind": "search"}).info.run_id)
    bare = client.create_experiment("bare")  # no petra search in it: left alone
    assert {e[1] for e in experiments(uri)} >= {"stale", "bare"}
    assert json.loads(client.get_experiment(stale).tags[SHARE_TAG_PREFIX + FRONTS_VIEW]) == view
    assert SHARE_TAG_PREFIX + FRONTS_VIEW not in client.get_experiment(bare).tags


