"""A search stopped by its time budget or by Ctrl-C still logs its best-so-far and its front."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_resume import config, runs
from tests.test_search_integration import run_cli

pytestmark = pytest.mark.integration


def artifacts(tmp_path: Path, name: str, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / name}.db")
    return {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.slow  # a search that runs out its time budget (~20 s): in make test's second run
def test_the_time_budget_ends_the_search_cleanly_with_its_front(tmp_path: Path) -> None:
    path = config(tmp_path, "budget")
    proc = run_cli("search", str(path), "--set", "search.generations=200",
                   "--set", "search.time_budget_s=6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "time budget of 6 s reached" in proc.stdout
    [parent], children = runs(tmp_path, "budget")
    assert parent.info.status == "FINISHED"
    assert 1 <= len(children) < 4 * 200  # ended by the budget, long before 200 generations
    assert {"front.json", "front.html", "front.png"} <= artifacts(tmp_path, "budget",
                                                                  parent.info.run_id)
    front = [c for c in children if c.data.tags["petra.on_front"] == "true"]
    assert front and all("test_accuracy" in c.data.metrics for c in front)


@pytest.mark.slow  # a search interrupted, then resumed (~55 s): in make test's second run
def test_ctrl_c_logs_the_front_so_far_and_resume_finishes_it(tmp_path: Path) -> None:
    path = config(tmp_path, "sigint")
    proc = subprocess.Popen([sys.executable, "-m", "petra.cli", "search", str(path), "--set",
                             "search.generations=6"], cwd=tmp_path, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        _, children = runs(tmp_path, "sigint")
        if sum(c.info.status == "FINISHED" for c in children) >= 5:
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in out and "Pareto front" in out
    [parent], before = runs(tmp_path, "sigint")
    assert parent.info.status == "KILLED"
    assert {"front.json", "front.csv", "front.html", "front.png"} <= artifacts(
        tmp_path, "sigint", parent.info.run_id)
    assert any(c.data.tags["petra.on_front"] == "true" for c in before)

    resumed = run_cli("resume", parent.info.run_id, "--set",
                      f"tracking.uri=sqlite:///{tmp_path / 'sigint'}.db", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    [parent], after = runs(tmp_path, "sigint")
    assert parent.info.status == "FINISHED"
    hashes = [c.data.tags["petra.genome_hash"] for c in after]
    assert len(hashes) == len(set(hashes)) and len(after) > len(before)
