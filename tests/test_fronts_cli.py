"""`petra front`, `petra compare` and `petra export` on two real searches in a sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ON_TWO_SEARCHES
from tests.test_search_integration import run_cli

pytestmark = [pytest.mark.integration, ON_TWO_SEARCHES]


def children(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                              max_results=1000)


def test_front_prints_the_searchs_front_as_a_table_and_as_json(two_searches):
    folder, uri, (a, _b) = two_searches
    proc = run_cli("front", a, "--json", "--set", f"tracking.uri={uri}", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    on_front = {c.info.run_id for c in children(uri, a) if c.data.tags["petra.on_front"] == "true"}
    assert {m["id"] for m in data["members"]} == on_front
    assert all("test_accuracy" in m["metrics"] for m in data["members"])
    assert data["knee"] in on_front and data["run_id"] == a
    table = run_cli("front", a, "--set", f"tracking.uri={uri}", cwd=folder)
    assert table.returncode == 0
    assert "Pareto front" in table.stdout
    for run_id in on_front:
        assert run_id[:8] in table.stdout


def recomputed_hypervolumes(uri: str, run_ids: list[str]) -> list[float]:
    """Each search's hypervolume from its candidate runs' metrics alone (numpy + moocore)."""
    import moocore
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    baselines = [client.get_run(r).data.metrics for r in run_ids]
    ref = np.array([-(min(b["baseline_val_accuracy"] for b in baselines) - 0.1), 1.0, 1.0])
    out = []
    for run_id, base in zip(run_ids, baselines, strict=True):
        pts = np.array([[-c.data.metrics["val_accuracy"],
                         c.data.metrics["artifact_bytes"] / base["baseline_bytes"],
                         c.data.metrics["latency_ratio"]]
                        for c in children(uri, run_id) if c.data.tags["petra.status"] == "complete"])
        keep = [i for i, p in enumerate(pts)
                if not any((q <= p).all() and (q < p).any() for q in pts)]
        front = pts[keep]
        front = front[(front < ref).all(axis=1)]
        out.append(float(moocore.hypervolume(front, ref=ref)) if len(front) else 0.0)
    return out


def test_compare_writes_plots_and_a_table_and_logs_a_matching_comparison_run(two_searches):
    from mlflow.tracking import MlflowClient

    folder, uri, run_ids = two_searches
    out = folder / "cmp"
    proc = run_cli("compare", *run_ids, "--out", str(out), "--set", f"tracking.uri={uri}",
                   cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("compare.html", "compare.png", "compare.csv", "compare.md", "compare.json"):
        assert (out / name).stat().st_size > 0
    assert "hypervolume" in proc.stdout and "coverage" in proc.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("petra-comparisons")
    [run] = client.search_runs([exp.experiment_id], filter_string='tags.petra.kind = "comparison"')
    assert run.data.tags["petra.compared_runs"] == ",".join(run_ids)
    assert run.info.run_id in proc.stdout
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "compare.html", "compare.png", "compare.csv", "compare.json"}
    logged = [v for k, v in sorted(run.data.metrics.items()) if k.startswith("hypervolume.")]
    report = json.loads((out / "compare.json").read_text())
    by_label = [report["hypervolume"][s["label"]] for s in report["searches"]]
    assert sorted(logged) == pytest.approx(sorted(by_label))
    assert by_label == pytest.approx(recomputed_hypervolumes(uri, run_ids))


def test_run_commands_reject_bad_run_ids_in_one_line(two_searches):
    folder, uri, (a, b) = two_searches
    store = ["--set", f"tracking.uri={uri}"]
    cases = [
        (("front", "0" * 32), "no run"),
        (("compare", a), "at least two"),
        (("export", a, "f" * 32, "--out", str(folder / "x")), "not a candidate"),
        (("front", children(uri, a)[0].info.run_id), "give the search run's id"),
    ]
    for args, message in cases:
        proc = run_cli(*args, *store, cwd=folder)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert lines[0].startswith("petra: error: ")  # an argument, not the config


def test_a_search_run_is_named_by_a_unique_prefix(two_searches):
    """``petra compare`` labels each search with 8 characters of its id; ``petra front`` took
    only the whole id ("config error: run_id: no run '368a4726'")."""
    folder, uri, (a, b) = two_searches
    store = ["--set", f"tracking.uri={uri}"]
    proc = run_cli("front", a[:8], "--json", *store, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["run_id"] == a
    shared = os.path.commonprefix([a, b])
    proc = run_cli("front", shared or "0" * 31, *store, cwd=folder)
    assert proc.returncode == 2
    assert ("is the prefix of 2 search runs" if shared else "no run") in proc.stderr


def test_a_candidate_is_measured_again_from_its_bundle_and_its_seed(two_searches, tmp_path):
    """`petra evaluate` of an exported member's genome.json measured another model (val
    0.9833 where the member had 0.9889): each candidate has a seed of its own, which nothing
    logged. It is the child run's tag petra.seed, the bundle's, and `--seed` takes it."""
    from tests.test_search_integration import tiny_config

    folder, uri, (a, _b) = two_searches
    members = [c for c in children(uri, a) if c.data.tags["petra.status"] == "complete"]
    member = max(members, key=lambda c: float(c.data.params.get("finetune.epochs", 0)))
    out = tmp_path / "bundle"
    proc = run_cli("export", a, member.info.run_id, "--out", str(out), "--set",
                   f"tracking.uri={uri}", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seed = json.loads((out / "metrics.json").read_text())["seed"]
    assert seed == int(member.data.tags["petra.seed"]) and seed != 3  # not the config's seed
    assert f"--seed {seed}" in (out / "MODEL_CARD.md").read_text()
    config = tiny_config(tmp_path, executor="local", name="search-a")
    again = run_cli("evaluate", str(config), "--genome", str(out / "genome.json"), "--seed",
                    str(seed), "--json", cwd=folder)
    assert again.returncode == 0, again.stderr[-2000:]
    metrics = json.loads(again.stdout)["metrics"]
    assert metrics["artifact_bytes"] == member.data.metrics["artifact_bytes"]
    assert metrics["val_accuracy"] == pytest.approx(member.data.metrics["val_accuracy"], abs=1e-9)
    genome = json.loads((out / "genome.json").read_text())
    assert all(not isinstance(v, str) or not v[:1].isdigit() for v in genome.values()), genome


def test_export_takes_the_knee_as_register_does(two_searches, tmp_path):
    """`petra register RUN knee` took the knee, `petra export RUN knee` said "run 'knee' is not
    a candidate of search ..."."""
    folder, uri, (a, _b) = two_searches
    knee = next(c for c in children(uri, a) if c.data.tags.get("petra.knee") == "true")
    out = tmp_path / "knee"
    proc = run_cli("export", a, "knee", "--out", str(out), "--set", f"tracking.uri={uri}",
                   cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert knee.info.run_id in (out / "MODEL_CARD.md").read_text()

@pytest.mark.slow
def test_an_exported_model_runs_in_a_fresh_environment_without_petra(two_searches, tmp_path):
    folder, uri, (a, _b) = two_searches
    member = next(c for c in children(uri, a) if c.data.tags["petra.on_front"] == "true")
    out = tmp_path / "bundle"
    proc = run_cli("export", a, member.info.run_id[:10], "--out", str(out), "--set",
                   f"tracking.uri={uri}", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"model.petra", "load_petra.py", "example.py", "example.npz",
                                              "MODEL_CARD.md", "genome.json", "metrics.json"}
    card = (out / "MODEL_CARD.md").read_text()
    metrics = member.data.metrics
    assert f"{metrics['test_accuracy']:.6g}" in card and member.info.run_id in card
    assert "from load_petra import load" in card

    # a new virtual environment holding numpy, onnx and onnxruntime only: no petra, no torch
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy", "onnx", "onnxruntime"],
                   check=True, timeout=600)
    # the caller's PYTHONPATH (a checkout run without installing) must not leak petra in
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; "
                            "print(u.find_spec('petra'), u.find_spec('torch'))"],
                           capture_output=True, text=True, check=True, cwd=out, env=env)
    assert probe.stdout.split() == ["None", "None"]
    ran = subprocess.run([str(py), "example.py"], cwd=out, capture_output=True, text=True,
                         env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "finite: True" in ran.stdout
    assert Path(out / "model.petra").read_bytes()[:2] == b"PK"
