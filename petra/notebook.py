"""petra from a notebook: ``petra.search`` and ``petra.load`` return a :class:`Result` whose
``front`` is a pandas DataFrame and whose ``plot()`` draws the front.

    import petra
    result = petra.search("search_spaces/quickstart.yaml", search__population=8, seed=3)
    result.front                       # one row per front member, the knee marked
    result.plot()                      # a plotly figure: size and latency against accuracy
    again = petra.load(result.run_id)  # the same search, read back from its MLflow store

Keyword overrides name a config key with ``__`` for each dot (``search__population=8`` is
``--set search.population=8``); their values may be any YAML value (numbers, strings, lists).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The columns of :attr:`Result.front`, after ``id`` and ``knee``; the recipe comes last.
COLUMNS = ("val_accuracy", "test_accuracy", "size_ratio", "latency_ratio", "artifact_bytes",
           "latency_ms", "params", "macs")


@dataclass
class Result:
    """A finished (or interrupted) search: its run, front, knee, baseline and records."""

    run_id: str
    uri: str
    snapshot: Any  # petra.engine.pareto.FrontSnapshot
    knee: str | None
    baseline: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def front(self) -> Any:
        """The front as a DataFrame: one row per member, with ``id``, ``knee``, the objectives
        and measurements, and its ``recipe`` in one line."""
        import pandas as pd

        from petra.space import summarize

        rows = []
        for member in self.snapshot.members:
            metrics = dict(member["metrics"])
            if member["id"] in self.test_accuracy:
                metrics["test_accuracy"] = self.test_accuracy[member["id"]]
            rows.append({"id": member["id"], "knee": member["id"] == self.knee,
                         **{k: metrics.get(k) for k in COLUMNS},
                         "recipe": summarize(member["genome"], member.get("metrics"))})
        return pd.DataFrame(rows, columns=["id", "knee", *COLUMNS, "recipe"])

    def plot(self) -> Any:
        """A plotly figure of the front: size ratio and latency ratio against validation
        accuracy, the knee marked, each point's recipe on hover."""
        from petra.tracking.plots import front_figure

        return front_figure(self.front, self.baseline)


def search(config: str | Path | Mapping[str, Any] | Any, *, progress: Any = None,
           **overrides: Any) -> Result:
    """Run a search from a config file, a dict, or a :class:`petra.config.SearchConfig`, with
    keyword ``overrides`` (see the module docstring)."""
    from petra.config import load_config
    from petra.engine import loop
    from petra.schema import SearchConfig

    sets = [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(config, SearchConfig):
        cfg = load_config(config.model_dump(mode="json"), sets) if sets else config
    else:
        cfg = load_config(config if isinstance(config, Mapping) else str(config), sets)
    done = loop.search(cfg, progress=progress)
    return Result(run_id=done.run_id, uri=cfg.tracking.uri, snapshot=done.front, knee=done.knee,
                  baseline=dict(done.baseline), records=list(done.records),
                  test_accuracy=dict(done.test_accuracy))


def load(run_id: str, uri: str = "sqlite:///runs/mlflow.db") -> Result:
    """A search read back from the MLflow store at ``uri`` (its front recomputed from its
    candidate runs, as ``petra front`` does)."""
    from petra.tracking.runs import open_search

    found = open_search(uri, run_id)
    snap = found.front()
    tests = {r["id"]: r["metrics"]["test_accuracy"] for r in found.records
             if "test_accuracy" in r["metrics"]}
    return Result(run_id=found.run_id, uri=uri, snapshot=snap, knee=found.knee,
                  baseline=dict(found.baseline), records=list(found.records),
                  test_accuracy=tests)
