"""Shared fixtures: a small, fast digits task and an isolated baseline cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The prunable convolutions of digits_cnn, in execution order.
DIGITS_CNN_CONVS = [
    "stem", "layer1.conv1", "layer1.conv2", "layer1.downsample.0", "layer2.conv1",
    "layer2.conv2", "layer2.downsample.0", "layer3.conv1", "layer3.conv2",
]

# A digits_cnn small enough to train in a few seconds on one thread.
TINY_TASK = {"name": "digits_cnn", "params": {"width": 8, "epochs": 6, "lr": 5e-3}}


def benchmark(name: str):
    """The script benchmarks/NAME.py as a module. benchmarks/ is no package: its scripts import
    each other by their names, so the folder goes on ``sys.path``, and each loads once."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Baselines of the test session are cached in a temporary folder, not in runs/. The
    workers of ``pytest -n`` (xdist) share one, beside their own temporary folders, as
    concurrent searches share ``runs/cache``."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "petra-cache"
    folder.mkdir(exist_ok=True)
    os.environ["PETRA_CACHE"] = str(folder)
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                       "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def tiny_task():
    """The tiny task, with its trained baseline (cached for the session)."""
    import torch

    from petra.candidate.baseline import prepare_baseline
    from petra.engine.loop import cache_dir
    from petra.tasks import load_task

    torch.set_num_threads(1)
    task = load_task(TINY_TASK["name"], TINY_TASK["params"])
    baseline = prepare_baseline(task, task_name=TINY_TASK["name"],
                                task_params=TINY_TASK["params"], cache_dir=cache_dir())
    return task, baseline


@pytest.fixture(scope="session")
def evaluator(tiny_task):
    from petra.candidate.evaluate import Evaluator

    _task, baseline = tiny_task
    return Evaluator(task_name=TINY_TASK["name"], task_params=TINY_TASK["params"],
                     baseline_state=baseline.state, baseline_artifact=baseline.artifact)


def take(batches, n: int) -> list:
    """The first ``n`` batches of a re-iterable."""
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.fixture
def model_copy(tiny_task):
    """A fresh copy of the tiny task's trained model, in eval mode."""
    import copy

    task, _ = tiny_task
    return copy.deepcopy(task.model).eval()


@pytest.fixture
def ctx(tiny_task, model_copy):
    """A pruning context over ``model_copy`` with two training batches and the task loss."""
    from petra.compress.prune import PruneContext

    task, _ = tiny_task
    return PruneContext(model=model_copy, batches=take(task.train, 2), loss=task.loss,
                        val_batches=take(task.val, 1))


ON_TWO_SEARCHES = pytest.mark.xdist_group("two_searches")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under ``--dist loadgroup`` xdist gives a grouped test's id its group (``...@name``). pytest
    9.2 broke that without a word (pytest-xdist#1386): each worker then built two_searches."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker(
            "xdist_group") and "@" not in item.nodeid:
        pytest.fail("--dist loadgroup did not group this test (pytest-xdist#1386): install "
                    "pytest<9.2", pytrace=False)


@pytest.fixture(scope="session")
def two_searches(tmp_path_factory):
    """Two tiny finished searches (NSGA-II and random) in one sqlite store, through the CLI.
    Each xdist worker that asks makes its own, so the files that use it are one xdist group
    (:data:`ON_TWO_SEARCHES`), run by one worker.

    Returns ``(folder, tracking uri, [run id, run id])``.
    """
    import re

    from tests.test_search_integration import run_cli, tiny_config

    folder = tmp_path_factory.mktemp("two-searches")
    run_ids = []
    for name, strategy in (("search-a", "nsga2"), ("search-b", "random")):
        config = tiny_config(folder, executor="local", name=name)
        proc = run_cli("search", str(config), "--set", f"search.strategy={strategy}",
                       "--set", "tracking.experiment=fronts", cwd=folder)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_ids.append(re.search(r"search run: (\w+)", proc.stdout).group(1))
    return folder, f"sqlite:///{folder / 'mlflow.db'}", run_ids


def stop_group(proc, sig: int, timeout_s: float = 30.0) -> None:
    """Send ``sig`` to ``proc``'s process group, then SIGKILL if it has not ended in time."""
    import contextlib
    import os
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def local_ray():
    """A local Ray cluster of 2 CPUs bound to loopback, shut down after the test; yields ray."""
    import ray

    from petra.engine.executor import LOOPBACK_ENV

    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
