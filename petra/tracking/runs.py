"""Searches read back from an MLflow store, for ``petra front``, ``compare`` and ``export``.

A :class:`SearchRun` is rebuilt from what the search logged: its config (``config.yaml``), its
baseline metrics, and one record per candidate run. Its front is recomputed from those records
with :func:`petra.engine.pareto.snapshot`, the same computation the search ran, so an interrupted
search has a front too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from petra.engine import pareto
from petra.errors import ConfigError, first_line
from petra.tracking.store import Tracker, open_client

if TYPE_CHECKING:
    from petra.schema import SearchConfig


#: Where every command that reads existing runs looks, unless ``--set tracking.uri=URI``.
DEFAULT_URI = "sqlite:///runs/mlflow.db"


@dataclass
class SearchRun:
    """One search as logged: run, config, baseline, and a record per candidate run."""

    uri: str
    run_id: str
    name: str
    experiment_id: str
    status: str
    config: SearchConfig
    baseline: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    knee: str | None = None

    @property
    def objectives(self) -> list[tuple[str, str]]:
        return self.config.objective_list

    @property
    def label(self) -> str:
        """The run's name and the first 8 characters of its id, e.g. ``quickstart/1a2b3c4d``."""
        return f"{self.name}/{self.run_id[:8]}"

    def front(self) -> Any:
        """The front of every candidate logged, feasible under the search's constraints."""

        generation = max((r["generation"] for r in self.records), default=0)
        return pareto.snapshot(self.records, self.objectives, self.baseline, generation,
                               self.config.constraints.model_dump())

    def record(self, candidate_id: str) -> dict[str, Any]:
        """The record of one candidate run of this search, by id or unique id prefix, or
        ``knee``: the search's knee."""
        if candidate_id == "knee":
            if self.knee is None:
                raise ConfigError("candidate", "knee", "", f"search {self.run_id} has no knee "
                                  "(no complete, feasible candidate); name a candidate run")
            candidate_id = self.knee
        found = [r for r in self.records if r["id"] == candidate_id]
        if not found and candidate_id:
            found = [r for r in self.records if r["id"].startswith(candidate_id)]
        if len(found) == 1:
            return found[0]
        if found:
            raise ConfigError("candidate", candidate_id, "", (
                f"{candidate_id!r} is the prefix of {len(found)} candidates of search "
                f"{self.run_id}; give more of the id"))
        raise ConfigError("candidate", candidate_id, "",
                          f"run {candidate_id!r} is not a candidate of search {self.run_id}")


def _param(text: str) -> Any:
    """A gene's value as logged: YAML's reading, where a number YAML 1.1 leaves a string
    (``1e-05``, with no dot) is a float."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)
    return value


def open_search(uri: str, run_id: str) -> SearchRun:
    """Read the search run ``run_id`` and its candidate runs from the store at ``uri``.

    Raises:
        petra.config.ConfigError: the run is missing, or is not a petra search run.
    """
    import yaml

    from petra.config import load_config

    client = open_client(uri)
    run = _search_run(client, run_id, uri)
    run_id = run.info.run_id
    kind = run.data.tags.get("petra.kind")
    if kind == "candidate":
        parent = run.data.tags.get("mlflow.parentRunId")
        raise ConfigError("run_id", run_id, "", f"run {run_id!r} is a candidate of search "
                          f"{parent}; give the search run's id")
    text = Tracker.read_text(uri, run_id, "config.yaml")
    if kind != "search" or text is None:
        raise ConfigError("run_id", run_id, "", f"run {run_id!r} in {uri} is not a petra search")
    config = load_config(yaml.safe_load(text), [f"tracking.uri={uri}"])
    metrics = run.data.metrics
    baseline = {key: float(metrics[f"baseline_{name}"]) for key, name in (
        ("val_accuracy", "val_accuracy"), ("test_accuracy", "test_accuracy"),
        ("artifact_bytes", "bytes"), ("latency_ms", "latency_ms"), ("params", "params"),
        ("macs", "macs")) if f"baseline_{name}" in metrics}
    search = SearchRun(uri=uri, run_id=run_id, name=run.info.run_name or run_id[:8],
                       experiment_id=run.info.experiment_id, status=run.info.status,
                       config=config, baseline=baseline)
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        max_results=50000)
    for child in sorted(children, key=lambda c: c.info.start_time):
        tags = child.data.tags
        if "petra.status" not in tags:  # killed while it was being logged
            continue
        search.records.append({
            "id": child.info.run_id,
            "genome": {k: _param(v) for k, v in child.data.params.items()},
            "metrics": dict(child.data.metrics),
            "status": tags["petra.status"],
            "generation": int(tags.get("petra.generation", 0)),
            "genome_hash": tags.get("petra.genome_hash", ""),
            "on_front": tags.get("petra.on_front") == "true",
            "seed": int(tags["petra.seed"]) if tags.get("petra.seed", "").isdigit() else None,
        })
        if tags.get("petra.knee") == "true":
            search.knee = child.info.run_id
    return search


def full_id(uri: str, run_id: str) -> str:
    """The id of the search run that ``run_id`` names in full or by a unique prefix."""
    return _search_run(open_client(uri), run_id, uri).info.run_id


def _search_run(client: Any, run_id: str, uri: str) -> Any:
    """The run ``run_id`` names in full, or the search run it names by a unique prefix."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return _by_prefix(client, run_id, uri)


def _by_prefix(client: Any, prefix: str, uri: str) -> Any:
    """The search run whose id starts with ``prefix`` (``petra compare`` prints 8 characters)."""
    from mlflow.exceptions import MlflowException

    try:
        experiments = [e.experiment_id for e in client.search_experiments()] if re.fullmatch(
            r"[0-9a-f]{1,32}", prefix) else []
        found = [r for r in client.search_runs(
            experiments, filter_string="tags.`petra.kind` = 'search'", max_results=50000)
            if r.info.run_id.startswith(prefix)] if experiments else []
    except MlflowException as exc:  # a store that does not answer
        raise ConfigError("run_id", prefix, "", f"cannot read {uri} ({first_line(exc, 300)})"
                          ) from None
    if len(found) > 1:
        raise ConfigError("run_id", prefix, "", f"{prefix!r} is the prefix of {len(found)} "
                          f"search runs in {uri}; give more of the id")
    if not found:
        raise ConfigError("run_id", prefix, "", f"no run {prefix!r} in {uri}")
    return found[0]


def hypervolume_history(uri: str, run_id: str) -> list[list[float]]:
    """A search's anytime curve: each logged generation's hypervolume against the seconds since
    its run started, ``[[seconds, hypervolume], ...]`` in generation order."""
    client = open_client(uri)
    start = client.get_run(run_id).info.start_time
    return [[(m.timestamp - start) / 1000.0, m.value]
            for m in sorted(client.get_metric_history(run_id, "hypervolume"),
                            key=lambda m: m.step)]


def open_searches(uri: str, run_ids: Sequence[str]) -> list[SearchRun]:
    return [open_search(uri, run_id) for run_id in run_ids]


def split_store(overrides: Sequence[str]) -> tuple[str, list[str]]:
    """``tracking.uri`` out of ``--set`` overrides (default :data:`DEFAULT_URI`), and the rest."""
    uri, rest = DEFAULT_URI, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "tracking.uri":
            uri = value.strip()
        else:
            rest.append(item)
    return uri, rest
