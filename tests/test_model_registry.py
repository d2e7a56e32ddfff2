"""`petra register`: a search's knee in MLflow's Model Registry, loaded back through
``models:/NAME@knee`` and served by ``mlflow models serve`` on 127.0.0.1, with the outputs of
the artifact in ONNX Runtime."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.conftest import ON_TWO_SEARCHES, stop_group
from tests.test_search_integration import run_cli

pytestmark = [pytest.mark.integration, ON_TWO_SEARCHES]

NAME = "digits-knee"


@pytest.fixture(scope="module")
def registered(two_searches):
    folder, uri, run_ids = two_searches
    proc = run_cli("register", run_ids[0], "knee", "--name", NAME, "--alias", "knee",
                   "--set", f"tracking.uri={uri}", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"registered {NAME} version 1" in proc.stdout
    # MLflow warned twice that `predict` has no type hints (it cannot type numpy arrays; the
    # logged signature checks the inputs), and logged an INFO line: noise on a documented command
    assert "type hints" not in proc.stderr and "INFO mlflow" not in proc.stderr, proc.stderr
    return folder, uri, run_ids[0]


def knee_reference(uri: str, search_run_id: str):
    """The knee's example batch and what its artifact answers in ONNX Runtime."""
    from petra.candidate import artifact
    from petra.tasks import load_task
    from petra.tasks.contract import feed
    from petra.tracking.runs import open_search
    from petra.tracking.store import Tracker

    search = open_search(uri, search_run_id)
    data = Tracker.fetch(uri, search.knee, "model.petra")
    task = load_task(search.config.task.name, search.config.task.params)
    example = {k: np.asarray(v) for k, v in feed(task.example_input, task.input_names).items()}
    return search, example, artifact.load(data, threads=1).run(None, example)[0]


def test_the_registered_knee_loads_back_with_the_artifact_s_outputs(registered):
    import mlflow
    from mlflow.tracking import MlflowClient

    _folder, uri, search_run_id = registered
    search, example, expected = knee_reference(uri, search_run_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@knee")
    [x] = example.values()
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-6, atol=1e-6)
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        NAME, "knee")
    tags = version.tags
    assert tags["petra.search_run_id"] == search_run_id
    assert tags["petra.candidate_run_id"] == search.knee
    assert {"petra.val_accuracy", "petra.size_ratio", "petra.latency_ratio",
            "petra.recipe"} <= set(tags)
    knee = next(r for r in search.records if r["id"] == search.knee)
    assert float(tags["petra.size_ratio"]) == pytest.approx(knee["metrics"]["size_ratio"],
                                                            rel=1e-5)
    # logged in the search's experiment, from the knee's run, which is left as it was
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    [logged] = client.search_logged_models(experiment_ids=[search.experiment_id])
    assert logged.source_run_id == search.knee
    assert logged.model_id in version.source
    run = client.get_run(search.knee)
    assert run.info.status == "FINISHED"
    assert (run.info.end_time - run.info.start_time) / 1000 == pytest.approx(
        run.data.metrics["eval_time_s"], abs=0.01)


def test_a_candidate_without_an_artifact_is_a_one_line_error(two_searches):
    folder, uri, run_ids = two_searches
    proc = run_cli("register", run_ids[0], "nosuchrun", "--name", NAME,
                   "--set", f"tracking.uri={uri}", cwd=folder)
    assert proc.returncode == 2
    assert proc.stderr.startswith("petra: error: candidate")


def test_a_name_mlflow_refuses_is_a_one_line_error_and_logs_nothing(two_searches):
    """It was a 30-line traceback, after a logged model was made for every try."""
    import mlflow

    folder, uri, run_ids = two_searches
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_run(run_ids[0]).info.experiment_id
    before = len(mlflow.search_logged_models(experiment_ids=[experiment], output_format="list"))
    proc = run_cli("register", run_ids[0], "knee", "--name", "bad name/x",
                   "--set", f"tracking.uri={uri}", cwd=folder)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("petra: error: --name: MLflow refuses 'bad name/x'")
    assert "Traceback" not in proc.stderr
    after = len(mlflow.search_logged_models(experiment_ids=[experiment], output_format="list"))
    assert after == before


def test_a_candidate_prefix_of_any_length_is_enough_where_it_is_unique(two_searches):
    from petra.tracking.runs import open_search

    _folder, uri, run_ids = two_searches
    search = open_search(uri, run_ids[0])
    ids = [r["id"] for r in search.records]

    def shortest(i: str) -> int:
        return next(n for n in range(1, 33) if sum(j.startswith(i[:n]) for j in ids) == 1)

    target = min(ids, key=shortest)
    assert shortest(target) < 4  # below 4 characters, a prefix was taken for no candidate
    assert search.record(target[:shortest(target)])["id"] == target


def test_mlflow_models_serve_answers_a_scoring_request_on_loopback(registered):
    from petra.tracking.ui import free_port

    folder, uri, search_run_id = registered
    _search, example, expected = knee_reference(uri, search_run_id)
    port = free_port()
    # mlflow runs `uvicorn` from PATH: this environment's, as an activated venv would have it
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": path}
    log = open(folder / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@knee",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (folder / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (folder / "serve.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            time.sleep(0.5)
        [x] = example.values()
        request = urllib.request.Request(
            f"{url}/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = np.asarray(json.loads(answer.read())["predictions"])
        np.testing.assert_allclose(predictions, expected, rtol=1e-5, atol=1e-5)
    finally:
        stop_group(proc, signal.SIGTERM)
        log.close()
