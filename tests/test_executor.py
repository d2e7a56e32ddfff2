"""The Ray executor on a real local cluster: warm workers, loopback only, results as completed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import TINY_TASK

pytestmark = pytest.mark.integration

LOOPBACK = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")


def listeners_of(pids: set[int]) -> list[str]:
    """Local addresses of listening TCP sockets owned by ``pids`` (from ``ss -ltnp``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if any(f"pid={pid}," in line for pid in pids):
            found.append(fields[3])
    return found


def ray_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    names = ("ray::", "raylet", "gcs_server", "/ray/", "dashboard")
    return {int(line.split()[0]) for line in out.splitlines()[1:] if any(n in line for n in names)}


def test_ray_executor_runs_jobs_on_warm_loopback_workers(tiny_task) -> None:
    from petra.engine.executor import Job, RayExecutor

    _task, baseline = tiny_task
    executor = RayExecutor(
        evaluator_kwargs={"task_name": TINY_TASK["name"], "task_params": TINY_TASK["params"],
                          "baseline_state": baseline.state,
                          "baseline_artifact": baseline.artifact},
        workers=2, cpus_per_candidate=1,
    )
    try:
        jobs = [Job(i, {"quant.scheme": q}, f"h{i}", i)
                for i, q in enumerate(["none", "int8_static", "none", "int8_static"])]
        results = list(executor.run(jobs))
        assert sorted(job.key for job, _ in results) == [0, 1, 2, 3]
        assert all(r.status == "complete" for _, r in results), [r.error for _, r in results]
        pids = {r.info["worker_pid"] for _, r in results}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2  # two warm actors, reused
        if len(os.sched_getaffinity(0)) >= 2 and len(pids) == 2:
            # each single-threaded worker measures on a core of its own
            cores = {r.info["worker_pid"]: r.info["core"] for _, r in results}
            assert None not in cores.values() and len(set(cores.values())) == 2
        int8 = [r for job, r in results if job.genome["quant.scheme"] == "int8_static"]
        assert all(r.metrics["size_ratio"] < 0.45 for r in int8)
        if shutil.which("ss"):
            addresses = listeners_of(ray_pids() | pids)
            assert addresses, "expected Ray to listen somewhere"
            assert all(a.startswith(LOOPBACK) for a in addresses), addresses
        accs = executor.test_accuracy([int8[0].artifact])
        assert 0.0 <= accs[0] <= 1.0
        # the workers start on the first jobs at the call, before the caller iterates (the
        # loop logs what racing screened out meanwhile)
        results = executor.run(jobs[:2])
        time.sleep(3.0)
        iterating = time.time()
        started = [r.info["started_at"] for _, r in results]
        assert len(started) == 2 and max(started) < iterating - 1.0
        # the caller's ``meanwhile`` tasks run while the workers evaluate, and a worker that
        # finishes in the meantime is given its next job at once, not when the caller iterates
        ended: list[float] = []
        results = executor.run(jobs, meanwhile=[lambda: time.sleep(0.25)] * 40
                               + [lambda: ended.append(time.time())])
        started = sorted(r.info["started_at"] for _, r in results)
        assert len(started) == 4 and started[-1] < ended[0], (started, ended)
        # closed before it was iterated, it stops the workers it started: the next run is not
        # queued behind them, and it runs on fresh workers
        before = set(executor._actors)
        executor.run(jobs[:2]).close()
        assert not before & set(executor._actors)
        assert [r.status for _, r in executor.run(jobs[:1])] == ["complete"]
    finally:
        executor.close()
