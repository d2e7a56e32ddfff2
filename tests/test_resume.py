"""Resume after SIGKILL: no finished candidate is evaluated again, none is lost, none counted
twice, and the front equals an uninterrupted run's with the same seed.

The objectives here are deterministic (accuracy and bytes), so the fronts can be compared
exactly; latency, being timed, would differ between any two runs. Fine-tunes of 2 epochs have a
multi-fidelity rung, so the kill and the resume also go through rung decisions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_TASK
from tests.test_search_integration import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "seed": 3, "task": TINY_TASK,
        "space": {"pruning": ["none", "magnitude", "l2_channel"], "sparsity": [0.0, 0.8],
                  "layers": {"exclude": ["fc"]}, "quantization": ["none", "int8_static"],
                  "finetune": {"epochs": [0, 2]}},
        "objectives": ["val_accuracy:max", "artifact_bytes:min"],
        "search": {"strategy": "nsga2", "population": 4, "generations": 3},
        "execution": {"executor": "local"},
        "tracking": {"uri": f"sqlite:///{tmp_path / name}.db", "experiment": name},
    }))
    return path


def runs(tmp_path: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / name}.db")
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return [], []
    found = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def front_hashes(children) -> set[str]:
    return {c.data.tags["petra.genome_hash"] for c in children
            if c.data.tags.get("petra.on_front") == "true"}


def test_sigkill_then_resume_repeats_and_loses_nothing(tmp_path: Path) -> None:
    reference = run_cli("search", str(config(tmp_path, "reference")), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    _, ref_children = runs(tmp_path, "reference")

    # the same search, killed with SIGKILL once 6 candidates (mid generation 2) have finished
    proc = subprocess.Popen([sys.executable, "-m", "petra.cli", "search",
                             str(config(tmp_path, "killed"))], cwd=tmp_path, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        _, children = runs(tmp_path, "killed")
        if sum(c.info.status == "FINISHED" for c in children) >= 6:
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the search ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    parents, before = runs(tmp_path, "killed")
    assert len(parents) == 1 and 6 <= len(before) < len(ref_children)
    run_id = parents[0].info.run_id

    resumed = run_cli("resume", run_id, "--set",
                      f"tracking.uri=sqlite:///{tmp_path / 'killed'}.db", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming search run" in resumed.stdout

    parents, children = runs(tmp_path, "killed")
    assert [p.info.run_id for p in parents] == [run_id]
    assert all(c.info.status == "FINISHED" for c in children)
    hashes = [c.data.tags["petra.genome_hash"] for c in children]
    assert len(hashes) == len(set(hashes))  # no genome evaluated (or logged) twice
    # nothing lost: every candidate finished before the kill is still there, none re-run
    finished_before = {c.info.run_id for c in before if c.info.status == "FINISHED"}
    assert finished_before <= {c.info.run_id for c in children}
    # the same evaluations as the uninterrupted run, and the same front
    assert sorted(hashes) == sorted(c.data.tags["petra.genome_hash"] for c in ref_children)
    assert front_hashes(children) == front_hashes(ref_children)
    statuses = {c.data.tags["petra.genome_hash"]: c.data.tags["petra.status"] for c in children}
    assert statuses == {c.data.tags["petra.genome_hash"]: c.data.tags["petra.status"]
                        for c in ref_children}
    assert parents[0].info.status == "FINISHED"
    # the child count is the evaluations the search planned, as its own metric counts them
    from mlflow.tracking import MlflowClient

    evaluated = MlflowClient(f"sqlite:///{tmp_path / 'killed'}.db").get_metric_history(
        run_id, "evaluated")
    assert max(evaluated, key=lambda m: m.step).value == len(children)
