"""End to end: `petra search` on a real local Ray cluster into a temporary sqlite MLflow store.

Nothing is mocked: the CLI runs in a subprocess, starts Ray on 127.0.0.1, evaluates real
candidates, and the test reads the run tree back through MlflowClient.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_TASK

pytestmark = pytest.mark.integration

CANDIDATE_METRICS = {"val_accuracy", "artifact_bytes", "size_ratio", "latency_ms",
                     "latency_ratio", "params", "macs"}
CANDIDATE_TAGS = {"petra.status", "petra.generation", "petra.on_front", "petra.genome_hash",
                  "petra.engine.executor", "petra.worker_pid"}
SEARCH_METRICS = {"hypervolume", "front_size", "evaluated", "failed", "baseline_val_accuracy",
                  "baseline_test_accuracy", "baseline_bytes", "baseline_latency_ms"}


def tiny_config(tmp_path: Path, *, executor: str, name: str) -> Path:
    config = {
        "name": name,
        "seed": 3,
        "task": TINY_TASK,
        "space": {"pruning": ["none", "magnitude", "l2_channel"], "sparsity": [0.0, 0.8],
                  "layers": {"exclude": ["fc"]}, "quantization": ["none", "int8_static"],
                  "regularizer": ["none", "l1"], "finetune": {"epochs": [0, 1]}},
        "search": {"strategy": "nsga2", "population": 4, "generations": 2},
        "execution": {"executor": executor, "workers": 2, "cpus_per_candidate": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": name},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "petra.cli", *args], cwd=cwd, env=dict(os.environ),
        capture_output=True, text=True, timeout=600,
    )


def read_runs(tmp_path: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_search_on_local_ray_logs_the_design_layout(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, executor="ray", name="it-ray")
    proc = run_cli("search", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pareto front" in proc.stdout and "search run:" in proc.stdout

    client, parents, children = read_runs(tmp_path, "it-ray")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id in proc.stdout
    # the journal keeps its records, and no artifact that MLflow now holds
    journal = tmp_path / "runs" / "journal" / parent.info.run_id
    assert (journal / "results.jsonl").stat().st_size > 0
    assert not list((journal / "artifacts").iterdir())
    assert SEARCH_METRICS <= set(parent.data.metrics)
    assert parent.data.params["search.population"] == "4"

    # every evaluated candidate is a child run of this search (duplicates are evaluated once)
    hashes = [c.data.tags["petra.genome_hash"] for c in children]
    assert 4 <= len(children) <= 8 and len(set(hashes)) == len(hashes)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    evaluated = client.get_metric_history(parent.info.run_id, "evaluated")
    assert evaluated[-1].value == len(children)

    # hypervolume: one step per generation, never decreasing
    history = sorted(client.get_metric_history(parent.info.run_id, "hypervolume"),
                     key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1]
    assert history[1].value >= history[0].value
    from petra.tracking.runs import hypervolume_history

    curve = hypervolume_history(f"sqlite:///{tmp_path / 'mlflow.db'}", parent.info.run_id)
    assert [hv for _, hv in curve] == [m.value for m in history]
    assert 0 < curve[0][0] <= curve[1][0]  # seconds since the search run started

    # MLflow's UI shows the experiment as model training, not GenAI
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    from petra.space import summarize

    for child in children:
        assert CANDIDATE_TAGS <= set(child.data.tags)
        assert child.data.tags["petra.engine.executor"] == "ray"
        # the description is the recipe, and the run lasts as long as its evaluation did
        note = child.data.tags["mlflow.note.content"]
        assert note and "\n" not in note
        duration = (child.info.end_time - child.info.start_time) / 1000
        if child.data.tags["petra.status"] == "complete":
            assert CANDIDATE_METRICS <= set(child.data.metrics)
            assert any(p.startswith("layers.") for p in child.data.params)
            assert duration >= child.data.metrics["eval_time_s"] - 0.01, duration
    # candidates ran in Ray worker processes, not in the driver
    pids = {c.data.tags["petra.worker_pid"] for c in children}
    assert pids and str(os.getpid()) not in pids
    driver_pid = parent.data.tags.get("petra.driver_pid")
    assert driver_pid and driver_pid not in pids

    front = [c for c in children if c.data.tags["petra.on_front"] == "true"]
    assert front and all("test_accuracy" in c.data.metrics for c in front)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"front.json", "front.csv", "front.html", "front.png", "config.yaml"} <= names
    front_json = client.download_artifacts(parent.info.run_id, "front.json", str(tmp_path))
    members = yaml.safe_load(Path(front_json).read_text())["members"]
    assert {c.info.run_id for c in front} == {m["id"] for m in members}
    notes = {c.info.run_id: c.data.tags["mlflow.note.content"] for c in front}
    assert all(notes[m["id"]] == summarize(m["genome"], m["metrics"]) for m in members)


def test_search_in_process_executor(tmp_path: Path) -> None:
    from petra.config import load_config
    from petra.engine.loop import search

    cfg = load_config(tiny_config(tmp_path, executor="local", name="it-local"),
                      ["search.generations=1", "constraints.max_accuracy_drop=0.05"])
    result = search(cfg)
    floor = result.baseline["val_accuracy"] - 0.05
    assert all(m["metrics"]["val_accuracy"] >= floor for m in result.front.members)
    _client, parents, children = read_runs(tmp_path, "it-local")
    assert [p.info.run_id for p in parents] == [result.run_id]
    assert {c.data.tags["petra.engine.executor"] for c in children} == {"local"}
    assert {c.data.tags["petra.worker_pid"] for c in children} == {str(os.getpid())}
    assert len(result.front.members) >= 1
    assert set(result.test_accuracy) == set(result.front.ids)


@pytest.mark.slow  # a multi-fidelity search (~30 s): in make test's second run
def test_multi_fidelity_stops_dominated_candidates_at_their_rung(tmp_path: Path) -> None:
    from petra.config import load_config
    from petra.engine.loop import search

    # Accuracy and bytes only, so the run is deterministic; headroom 0 so the rung stops
    # whatever the front of the earlier generations dominates after one epoch.
    cfg = load_config(tiny_config(tmp_path, executor="local", name="it-mf"), [
        "search.population=6", "search.generations=3", "space.finetune.epochs=[2, 3]",
        "search.multi_fidelity.headroom=0.0", "objectives=[val_accuracy:max, artifact_bytes:min]",
    ])
    result = search(cfg)
    client, parents, children = read_runs(tmp_path, "it-mf")
    by_status: dict[str, list] = {}
    for child in children:
        by_status.setdefault(child.data.tags["petra.status"], []).append(child)
    pruned = by_status.get("pruned", [])
    assert pruned, {k: len(v) for k, v in by_status.items()}
    for child in pruned:
        assert int(child.data.tags["petra.generation"]) >= 1  # generation 0 has no front yet
        assert "dominated" in child.data.tags["petra.pruned_reason"]
        assert child.data.metrics["fidelity_epochs"] == 1
        assert child.data.tags["petra.on_front"] == "false"
        assert child.info.run_id not in result.front.ids
        assert not client.list_artifacts(child.info.run_id, "model.petra")
    for child in by_status["complete"]:
        assert child.data.metrics["fidelity_epochs"] == float(child.data.params["finetune.epochs"])
        assert "rung_val_accuracy" in child.data.metrics
    history = client.get_metric_history(parents[0].info.run_id, "pruned")
    assert max(m.step for m in history) == 2
    assert sorted(history, key=lambda m: m.step)[-1].value == len(pruned)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["nsga2", "nsga3", "nsga2_level_switch", "optuna_nsga2",
                                      "optuna_tpe", "random", "grid"])
def test_every_strategy_completes_a_tiny_search_from_the_cli(tmp_path: Path, strategy: str):
    from petra.engine.strategies import STRATEGIES

    assert strategy in STRATEGIES  # the list above must follow the registry
    config = tiny_config(tmp_path, executor="local", name=f"it-{strategy}")
    proc = run_cli("search", str(config), "--set", f"search.strategy={strategy}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _client, parents, children = read_runs(tmp_path, f"it-{strategy}")
    assert len(parents) == 1 and parents[0].data.params["search.strategy"] == strategy
    hashes = [c.data.tags["petra.genome_hash"] for c in children]
    assert 4 <= len(children) <= 8 and len(set(hashes)) == len(hashes)
    assert parents[0].info.status == "FINISHED"


def test_the_strategy_list_of_the_cli_test_is_the_registry():
    from petra.engine.strategies import STRATEGIES

    assert sorted(STRATEGIES.names()) == sorted(
        ["nsga2", "nsga3", "nsga2_level_switch", "optuna_nsga2", "optuna_tpe", "random",
         "grid"])
