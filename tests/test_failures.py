"""Failing candidates: an exception, NaN, memory past the limit, a worker that dies.

The task (tests/faulty_task.py) injects the fault its parameters name for a hidden width, which
the genome sets by pruning ``fc1``: 24 neurons kept at sparsity 0.25, 20 at 0.375, 16 at 0.5,
12 at 0.625 and 8 at 0.75.
"""

from __future__ import annotations

import pytest

from petra.candidate.evaluate import COMPLETE, FAILED

TASK = "tests.faulty_task:faulty_mlp"
SPARSITY = {"raise": 0.25, "die": 0.375, "nan": 0.5, "die_once": 0.625, "memory": 0.75}
FAULTS = {"24": "raise", "20": "die", "16": "nan", "12": "die_once", "8": "memory"}


def genome(fault: str | None, epochs: int = 1) -> dict:
    sparsity = SPARSITY[fault] if fault else 0.125  # 28 neurons: healthy
    return {"layers.fc1.method": "l2_channel", "layers.fc1.sparsity": sparsity,
            "finetune.epochs": epochs, "finetune.lr": 1e-2}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    from petra.candidate.baseline import prepare_baseline
    from petra.engine.loop import cache_dir
    from petra.tasks import load_task

    params = {"faults": FAULTS, "marker_dir": str(tmp_path_factory.mktemp("markers"))}
    task = load_task(TASK, params)
    baseline = prepare_baseline(task, task_name=TASK, task_params=params, cache_dir=cache_dir())
    return params, baseline


def evaluator_for(faulty, memory_limit_mb):
    from petra.candidate.evaluate import Evaluator

    params, baseline = faulty
    return Evaluator(task_name=TASK, task_params=params, baseline_state=baseline.state,
                     baseline_artifact=baseline.artifact, memory_limit_mb=memory_limit_mb)


@pytest.mark.parametrize("epochs", [0, 1])
def test_each_fault_fails_its_candidate_with_its_error_and_the_next_one_is_fine(faulty, epochs):
    evaluator = evaluator_for(faulty, memory_limit_mb=1024)
    expected = {"raise": "ValueError: injected fault", "nan": "FloatingPointError",
                "memory": "memory limit exceeded"}
    for fault, error in expected.items():
        result = evaluator.evaluate(genome(fault, epochs), genome_hash=fault)
        assert result.status == FAILED
        assert error in result.error, result.error
        assert "traceback" in result.info and result.artifact is None
        healthy = evaluator.evaluate(genome(None, epochs))
        assert healthy.status == COMPLETE, healthy.error
        assert healthy.metrics["val_accuracy"] > 0.5


def test_the_memory_limit_is_lifted_after_each_candidate(faulty):
    import numpy as np

    evaluator = evaluator_for(faulty, memory_limit_mb=256)
    assert evaluator.evaluate(genome("memory")).status == FAILED
    block = np.ones(512 * 1024**2, dtype=np.uint8)  # more than the limit, outside a candidate
    assert int(block[-1]) == 1
    result = evaluator.evaluate(genome(None))
    assert result.status == COMPLETE and result.metrics["peak_rss_mb"] > 0


def test_without_a_limit_the_same_allocation_goes_through(faulty):
    # The 8 GiB block is reserved, not touched, so it fits on any machine: only the limit
    # makes it fail.
    result = evaluator_for(faulty, memory_limit_mb=None).evaluate(genome("memory"))
    assert result.status == COMPLETE, result.error


@pytest.mark.slow  # a worker killed, then retried (~25 s): in make test's second run
@pytest.mark.integration
def test_a_dead_worker_is_retried_once_then_failed(faulty):
    from petra.engine.executor import Job, RayExecutor

    params, baseline = faulty
    executor = RayExecutor(
        evaluator_kwargs={"task_name": TASK, "task_params": params,
                          "baseline_state": baseline.state, "baseline_artifact": baseline.artifact,
                          "memory_limit_mb": 1024},
        workers=2, cpus_per_candidate=1,
    )
    try:
        jobs = [Job(name, genome(name), name, 0) for name in ("die", "die_once", "raise")]
        jobs.append(Job("healthy", genome(None), "healthy", 0))
        results = {job.key: result for job, result in executor.run(jobs)}
        assert set(results) == {"die", "die_once", "raise", "healthy"}
        died = results["die"]
        assert died.status == FAILED and died.info["attempts"] == 2
        assert "worker died 2 times" in died.error
        # the first attempt's worker died; the retry on a fresh worker completed
        once = results["die_once"]
        assert once.status == COMPLETE and once.info["attempts"] == 2, once.error
        assert results["raise"].status == FAILED and results["raise"].info["attempts"] == 1
        assert results["healthy"].status == COMPLETE
        # the pool is whole again: two live workers evaluate the next batch
        again = list(executor.run([Job(i, genome(None, 0), f"h{i}", i) for i in range(2)]))
        assert all(r.status == COMPLETE for _, r in again)
    finally:
        executor.close()


@pytest.mark.slow  # a hung candidate waits out a time budget (~60 s): in make test's second run
@pytest.mark.integration
def test_a_hung_candidate_is_stopped_at_the_time_budget(tmp_path):
    """Candidates that prune fc1 to 6-16 neurons sleep for an hour. The budget must stop them:
    the search ends, logs its front (whose test accuracy needs the workers) and finishes its
    run, instead of waiting for the hung workers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from mlflow.tracking import MlflowClient

    config = {
        "name": "hang", "seed": 1,
        "task": {"name": TASK, "params": {"faults": {"6-16": "hang"}}},
        "space": {"pruning": ["none", "l2_channel"], "sparsity": [0.0, 0.9], "layers": {},
                  "quantization": ["none"], "finetune": {"epochs": [0, 0]}, "round_to": [1]},
        "objectives": ["val_accuracy:max", "artifact_bytes:min"],
        "search": {"strategy": "random", "population": 6, "generations": 50,
                   "time_budget_s": 45, "multi_fidelity": {"enabled": False}},
        "execution": {"executor": "ray", "workers": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "hang"},
    }
    path = tmp_path / "hang.yaml"
    path.write_text(yaml.safe_dump(config))
    # Without the budget's stop the search would wait an hour for the hung workers.
    root = str(Path(__file__).resolve().parents[1])  # where tests.faulty_task imports from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "petra.cli", "search", str(path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "time budget of 45 s reached" in proc.stdout
    assert "--set search.time_budget_s=S goes on" in proc.stdout  # the budget counts it all
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hang")
    found = client.search_runs([exp.experiment_id], max_results=1000)
    [parent] = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    # seed 1's first generation holds 2 hung candidates of 6: stopped, they are not recorded,
    # and the search never got past that generation
    assert 1 <= len(children) <= 4
    front = [c for c in children if c.data.tags.get("petra.on_front") == "true"]
    assert front and all("test_accuracy" in c.data.metrics for c in front)
