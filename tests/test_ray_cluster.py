"""A search against an existing Ray cluster (`ray start --head` on 127.0.0.1), via
`execution.address`. The test starts the cluster, runs a tiny search on it, and stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_search_integration import read_runs, run_cli, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interruptible() -> None:
    """``preexec_fn``: SIGINT back to its default in the child, whatever this process had."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ray_head(tmp_path: Path):
    """`ray start --head --block` on 127.0.0.1, in its own process group, stopped by SIGINT
    (as ctrl-c would: it exits in about 2 s, where SIGTERM took 33 s once a driver had run
    actors on it). A job started in the background by a script (CI) inherits SIGINT ignored,
    so the head gets SIGINT's default back (:func:`interruptible`).

    (`ray stop` would stop every Ray process on the machine, not just this cluster.)
    """
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ, **RAY_ENV}
    port = free_port()
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=interruptible,
    )
    try:
        deadline = time.monotonic() + 120
        while not _listening(port):
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGINT)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_search_on_a_ray_start_head_cluster(tmp_path: Path, ray_head: str) -> None:
    config = tiny_config(tmp_path, executor="ray", name="it-cluster")
    proc = run_cli("search", str(config), "--set", f"execution.address={ray_head}",
                   "--set", "search.generations=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _client, parents, children = read_runs(tmp_path, "it-cluster")
    assert len(parents) == 1 and len(children) >= 4
    assert parents[0].data.params["execution.address"] == ray_head
    assert {c.data.tags["petra.engine.executor"] for c in children} == {"ray"}
    assert all(c.data.tags["petra.status"] == "complete" for c in children)


def test_a_worker_larger_than_every_node_stops_the_search(tmp_path: Path, ray_head: str) -> None:
    """``cpus_per_candidate`` above the cluster's CPUs waited forever with no word (Ray's
    warning is not shown), and the search run stayed open; it now stops at once."""
    config = tiny_config(tmp_path, executor="ray", name="it-big-worker")
    proc = run_cli("search", str(config), "--set", f"execution.address={ray_head}",
                   "--set", "execution.cpus_per_candidate=3", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "execution.cpus_per_candidate: each worker reserves 3 CPUs on one node, and this " \
        "Ray cluster's largest node has 2" in proc.stderr


def test_an_address_where_no_cluster_listens_stops_the_search(tmp_path: Path) -> None:
    """Ray retried such an address for minutes with its own warnings until Ctrl-C, which
    left the search run RUNNING in MLflow with no candidate. Now one line, and no run."""
    config = tiny_config(tmp_path, executor="ray", name="it-no-cluster")
    address = f"127.0.0.1:{free_port()}"
    proc = run_cli("search", str(config), "--set", f"execution.address={address}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"execution.address: no Ray cluster answers at {address}" in proc.stderr
    assert "Traceback" not in proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("it-no-cluster")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
