"""MLflow tracking: the search run, its candidate child runs, and per-generation fronts.

Only the driver talks to MLflow. The layout (names are a contract, see DESIGN.md):

- search run: params = the config flattened; metrics by step = generation: ``hypervolume``,
  ``front_size``, ``evaluated``, ``failed``, ``pruned``; baseline metrics; artifacts ``config.yaml``,
  ``front.json``, ``front.csv``, ``front.html``, ``front.png``, and for each generation
  ``fronts/gen_NNN/front.{json,csv,png}``.
- candidate run: a child tagged ``mlflow.parentRunId``; params = genes; metrics from the
  Result; tags ``petra.search`` (the search run's name), ``petra.status``, ``petra.generation``,
  ``petra.on_front``, ``petra.genome_hash``, ``petra.engine.executor``, ``petra.worker_pid``, ``petra.error`` (failed),
  ``petra.pruned_reason`` (pruned), ``petra.attempts`` (when a dead worker's candidate was run
  again); the artifact ``model.petra``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petra.space import summarize
from petra.tracking import plots

if TYPE_CHECKING:
    from petra.candidate.evaluate import Result
    from petra.engine.pareto import FrontSnapshot


# MLflow 3 sends usage telemetry unless told not to; petra sends nothing anywhere.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Nor does it draw download progress bars over petra's own output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Nor MLflow's "View run ... at: URL" line per run that an http:// store ends: two per candidate.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# A server that is down should fail fast: petra's journal keeps results and retries later
# (petra.tracking.recorder), instead of MLflow's own retries holding the search for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


#: MLflow's UI shows an experiment as model training (not GenAI) by this tag and value.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def _millis(seconds: Any) -> int | None:
    """A wall-clock time in seconds as MLflow's milliseconds (None stays None)."""
    return None if seconds is None else int(float(seconds) * 1000)


def _metrics(metrics: Mapping[str, float], step: int = 0) -> list[Any]:
    """MLflow ``Metric`` entities of the finite values of ``metrics``, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))]


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite store, else the server's default."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / "artifacts").as_uri()
    return None


def transient_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "the store is away or busy", not "the request is wrong"."""
    from mlflow.exceptions import MlflowException

    errors: list[type[BaseException]] = [MlflowException, OSError, ConnectionError,
                                         TimeoutError]
    try:
        import requests

        errors.append(requests.exceptions.RequestException)
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    try:
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.SQLAlchemyError)
    except ImportError:  # pragma: no cover - mlflow depends on sqlalchemy
        pass
    return tuple(errors)


def retrying(fn: Any, *, attempts: int = 6, delay_s: float = 0.5) -> Any:
    """``fn()``, tried again on a store that is busy or not ready yet.

    Two searches that open one fresh sqlite store at once race to create its tables (one gets
    "table already exists"), and to create an experiment of the same name; the loser succeeds
    on its next try. Errors that persist are raised.
    """
    errors = transient_errors()
    for attempt in range(attempts):
        try:
            return fn()
        except errors:
            if attempt == attempts - 1:
                raise
            time.sleep(delay_s * (attempt + 1))
    return None  # pragma: no cover


@contextlib.contextmanager
def store_lock(uri: str):
    """Hold an exclusive lock beside a sqlite store (a no-op for a server).

    Opening a fresh or older sqlite store creates or migrates its tables. Two searches that do
    it at once can leave a half-done migration behind (``_alembic_tmp_experiments already
    exists``) that no retry repairs, so petra's processes open a sqlite store one at a time.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``, its store created or migrated under ``store_lock``."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        return retrying(lambda: MlflowClient(tracking_uri=uri))


class Tracker:
    """Logs one search into an MLflow store through ``MlflowClient``."""

    def __init__(self, *, uri: str, experiment: str) -> None:
        import mlflow.tracking  # noqa: F401  (mlflow sets its loggers' levels on import)

        # MLflow's own INFO lines (creating database tables...) would interleave with petra's;
        # MLFLOW_LOGGING_LEVEL still decides when it is set.
        if "MLFLOW_LOGGING_LEVEL" not in os.environ:
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri
        self.client = open_client(uri)
        with store_lock(uri):
            self.experiment_id = retrying(lambda: self._experiment(experiment))
        self.run_id: str | None = None
        self.run_name = ""

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if need be; shown as model training, with petra's
        fronts view (:mod:`petra.tracking.views`) saved on it."""
        from petra.tracking.views import save_view, view_tag

        found = self.client.get_experiment_by_name(name)
        if found is None:
            view, state = view_tag()
            return self.client.create_experiment(name, artifact_location=artifact_root(self.uri),
                                                 tags={EXPERIMENT_KIND: MODEL_TRAINING,
                                                       view: state})
        if found.tags.get(EXPERIMENT_KIND) is None:
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        save_view(self.client, found)
        return found.experiment_id

    # -- the search run -------------------------------------------------------------------
    def start_search(
        self, *, name: str, params: Mapping[str, str], config_yaml: str,
        baseline: Mapping[str, float], tags: Mapping[str, str] = {},
        texts: Mapping[str, str] = {}, metrics: Mapping[str, float] = {},
    ) -> str:
        """Create the search run: its params, config, baseline metrics (``baseline_*``),
        ``tags``, and further text artifacts and metrics."""
        from mlflow.entities import Param, RunTag

        run = retrying(lambda: self.client.create_run(
            self.experiment_id, run_name=name, tags={"petra.kind": "search", **tags}))
        self.run_id, self.run_name = run.info.run_id, run.info.run_name
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        for path, text in {"config.yaml": config_yaml, **texts}.items():
            self.client.log_text(self.run_id, text, path)
        self.log_metrics(self.run_id, {**{f"baseline_{k}": v for k, v in baseline.items()},
                                       **metrics})
        self.client.log_batch(self.run_id, tags=[RunTag("petra.status", "running")])
        return self.run_id

    def attach(self, run_id: str, *, driver_pid: int) -> None:
        """Continue logging into an existing search run (for resume)."""
        from mlflow.entities import RunTag

        run = self.client.get_run(run_id)
        if run.data.tags.get("petra.kind") != "search":
            raise ValueError(f"run {run_id} is not a petra search run")
        self.run_id, self.run_name = run_id, run.info.run_name
        self.experiment_id = run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        self.client.log_batch(run_id, tags=[RunTag("petra.status", "running"),
                                            RunTag("petra.driver_pid", str(driver_pid))])

    def checkpoint(self, text: str, name: str) -> None:
        """Overwrite the search run's checkpoint artifact."""
        self.client.log_text(self.run_id, text, name)

    @staticmethod
    def read_text(uri: str, run_id: str, path: str) -> str | None:
        """The text of a run's artifact, or None when the run or the artifact is missing."""
        data = Tracker.fetch(uri, run_id, path)
        return None if data is None else data.decode()

    def download(self, run_id: str, path: str) -> bytes | None:
        """The bytes of a run's artifact in this store, or None when it is missing."""
        return self.fetch(self.uri, run_id, path)

    @staticmethod
    def fetch(uri: str, run_id: str, path: str) -> bytes | None:
        """The bytes of a run's artifact in the store at ``uri``, or None when it is missing."""
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(prefix="petra-") as tmp:
            try:
                local = open_client(uri).download_artifacts(run_id, path, tmp)
            except (MlflowException, OSError):
                return None
            return Path(local).read_bytes()

    def children(self) -> list[Any]:
        """The candidate runs of this search (every status)."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
            max_results=50000,
        )

    def logged_steps(self, metric: str) -> set[int]:
        """The steps at which this search run already logged ``metric``."""
        return {m.step for m in self.client.get_metric_history(self.run_id, metric)}

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        items = _metrics(metrics, step)
        if items:
            self.client.log_batch(run_id, metrics=items)

    # -- candidates -----------------------------------------------------------------------
    def log_candidate(
        self, result: Result, *, generation: int, index: int, executor: str
    ) -> str:
        """One child run for one evaluated candidate; returns its run id."""
        from mlflow.entities import Param, RunTag

        tags = {
            "mlflow.parentRunId": self.run_id,
            "petra.kind": "candidate",
            "petra.search": self.run_name,  # its search run's name, a column of the fronts view
            "petra.status": result.status,
            "petra.generation": str(generation),
            "petra.genome_hash": result.genome_hash,
            "petra.on_front": "false",
            "petra.engine.executor": executor,
            "petra.worker_pid": str(result.info.get("worker_pid", "")),
            # 2: measured in full; 0: screened out by racing (petra.engine.racing)
            "petra.tier": str(result.info.get("tier", 2)),
            # its pruning and fine-tune seed: `petra evaluate --seed` measures it again
            "petra.seed": str(result.info.get("seed", "")),
            "mlflow.note.content": summarize(result.genome, result.metrics),  # the run's description
        }
        if result.error:
            tags["petra.error"] = result.error[:5000]
        if result.info.get("pruned"):
            tags["petra.pruned_reason"] = str(result.info["pruned"])[:5000]
        if result.info.get("attempts", 1) > 1:
            tags["petra.attempts"] = str(result.info["attempts"])
        for key, value in result.info.get("effective", {}).items():
            tags[f"petra.effective_{key}"] = str(bool(value)).lower()
        started, ended = (_millis(result.info.get(k)) for k in ("started_at", "ended_at"))
        # the evaluation's own start, so that the UI shows its real duration, not the logging's
        run = self.client.create_run(
            self.experiment_id, run_name=f"g{generation:02d}-c{index:02d}", tags=tags,
            start_time=started)
        run_id = run.info.run_id
        # params, metrics and the index in one call (MLflow takes 100 params per call)
        params = [Param(k, str(v)) for k, v in result.genome.items()]
        self.client.log_batch(run_id, params=params[:100], metrics=_metrics(result.metrics),
                              tags=[RunTag("petra.candidate_index", str(index))])
        for start in range(100, len(params), 100):
            self.client.log_batch(run_id, params=params[start:start + 100])
        if result.artifact:
            with tempfile.TemporaryDirectory(prefix="petra-") as tmp:
                path = Path(tmp) / "model.petra"
                path.write_bytes(result.artifact)
                self.client.log_artifact(run_id, str(path))
        if "traceback" in result.info:
            self.client.log_text(run_id, result.info["traceback"], "error.txt")
        self.client.set_terminated(run_id, "FAILED" if result.status == "failed" else "FINISHED",
                                   end_time=ended)
        return run_id

    # -- fronts ---------------------------------------------------------------------------
    def log_generation(
        self, snap: FrontSnapshot, records: list[Mapping[str, Any]], baseline: Mapping[str, float]
    ) -> None:
        """Generation metrics (step = generation) and that generation's front, as
        ``fronts/gen_NNN/front.{json,csv,png}``."""
        self.log_metrics(self.run_id, {
            "hypervolume": snap.hypervolume,
            "front_size": len(snap.members),
            "evaluated": snap.evaluated,
            "failed": snap.failed,
            "pruned": snap.pruned,
        }, step=snap.generation)
        self._log_front(snap, records, baseline, f"fronts/gen_{snap.generation:03d}")

    def _log_front(
        self, snap: FrontSnapshot, records: list[Mapping[str, Any]], baseline: Mapping[str, float],
        folder: str | None,
    ) -> None:
        def path(name: str) -> str:
            return f"{folder}/{name}" if folder else name

        self.client.log_text(self.run_id, snap.to_json(), path("front.json"))
        self.client.log_text(self.run_id, snap.to_csv(), path("front.csv"))
        if folder is None:  # the interactive page inlines plotly.js (~5 MB): the final front's
            self.client.log_text(self.run_id, plots.front_html(snap, records, baseline),
                                 path("front.html"))
        with tempfile.TemporaryDirectory(prefix="petra-") as tmp:
            png = Path(tmp) / "front.png"
            plots.front_png(snap, records, baseline, png)
            self.client.log_artifact(self.run_id, str(png), folder)

    def finish(
        self, snap: FrontSnapshot, *, test_accuracy: Mapping[str, float], knee: str | None,
        records: list[Mapping[str, Any]], baseline: Mapping[str, float], status: str = "FINISHED",
    ) -> None:
        """Mark the final front on its candidate runs and log the front artifacts."""
        from mlflow.entities import RunTag

        for run_id, acc in test_accuracy.items():
            self.log_metrics(run_id, {"test_accuracy": acc})
        for run_id in snap.ids:
            tags = [RunTag("petra.on_front", "true")]
            if run_id == knee:
                tags.append(RunTag("petra.knee", "true"))
            self.client.log_batch(run_id, tags=tags)
        self._log_front(snap, records, baseline, None)
        self.client.log_batch(self.run_id, tags=[
            RunTag("petra.status", status.lower()),
            RunTag("petra.front_size", str(len(snap.members))),
        ])
        self.client.set_terminated(self.run_id, status)
