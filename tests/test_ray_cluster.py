"""A search against an existing Ray cluster (`ray start --head` on 127.0.0.1), via
`execution.address`. The test starts the cluster, runs a tiny search on it, and stops it."""

from __future__ import annotations

from pathlib import Path

import pytest

from petra.tracking.ui import free_port
from tests.conftest import benchmark
from tests.test_search_integration import read_runs, run_cli, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

faults = benchmark("faults")


@pytest.fixture
def ray_head(tmp_path: Path):
    """`ray start --head` on 127.0.0.1 for one test (:func:`benchmarks.faults.ray_head`)."""
    with faults.ray_head(tmp_path / "ray-head.log") as address:
        yield address


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
