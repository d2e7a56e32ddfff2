"""A saved view of MLflow's runs page that opens on the fronts, charted.

MLflow's experiment page restores a view state (its search filter, columns, chart cards) from an
experiment tag ``mlflow.sharedViewState.<key>`` when its URL carries ``viewStateShareKey=<key>``:
what the UI's own *Share* button writes. petra writes one such view on every experiment it logs to,
so that the link ``petra ui`` prints opens the runs page with:

- only the candidates on a front (``tags.petra.on_front = "true"``), all of them visible;
- the objectives as the first columns: validation and test accuracy, size ratio, latency ratio,
  artifact bytes; then the search each candidate belongs to (MLflow's own columns before
  them: its name, its start and how long its evaluation took);
- in chart mode, three scatter plots: accuracy against size ratio, accuracy against latency
  ratio, and size against latency, one point per front member, coloured by run.

The state is plain JSON, which the UI reads as it reads its own (uncompressed) shares.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

#: The experiment tag prefix and URL parameter of MLflow's shared view states.
SHARE_TAG_PREFIX, SHARE_URL_PARAM = "mlflow.sharedViewState.", "viewStateShareKey"
#: petra's view: its key (the tag is ``SHARE_TAG_PREFIX + FRONTS_VIEW``).
FRONTS_VIEW = "petra-fronts"
FRONT_FILTER = 'tags.petra.on_front = "true"'
#: The columns first shown, in order: the objectives, then what they were measured as.
OBJECTIVE_COLUMNS = ("val_accuracy", "test_accuracy", "size_ratio", "latency_ratio",
                     "artifact_bytes")
#: (x, y) metric pairs of the scatter charts.
SCATTERS = (("size_ratio", "val_accuracy"), ("latency_ratio", "val_accuracy"),
            ("size_ratio", "latency_ratio"))
#: Points a scatter card draws at most (MLflow's default is 100).
MAX_POINTS = 500


def _column(metric: str) -> str:
    return f"metrics.`{metric}`"


def fronts_view() -> dict[str, Any]:
    """The view state: MLflow's search facets and experiment-page UI state fields."""
    section = "petra-objectives"
    charts = [{
        "uuid": f"petra-{x}-{y}", "type": "SCATTER", "deleted": False, "isGenerated": False,
        "metricSectionId": section, "runsCountToCompare": MAX_POINTS,
        "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"},
    } for x, y in SCATTERS]
    columns = [*(_column(m) for m in OBJECTIVE_COLUMNS), "tags.`petra.search`"]
    return {
        # search facets
        "searchFilter": FRONT_FILTER,
        "orderByKey": _column("size_ratio"),
        "orderByAsc": True,
        # UI state
        "selectedColumns": columns,
        "columnOrder": ["tags.`mlflow.runName`", "attributes.start_time", "duration", *columns],
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": "petra: the fronts' objectives",
                                "display": True, "isReordered": True, "deleted": False,
                                "isGenerated": False}],
        "isAccordionReordered": True,
        "runsHiddenMode": "SHOW_ALL",
        "hideEmptyCharts": True,
        "viewMaximized": False,
        "runListHidden": False,
        "groupBy": None,
    }


def view_tag() -> tuple[str, str]:
    """The experiment tag that holds :func:`fronts_view`."""
    return SHARE_TAG_PREFIX + FRONTS_VIEW, json.dumps(fronts_view(), sort_keys=True)


def save_view(client: Any, experiment: Any) -> None:
    """Save petra's fronts view on ``experiment`` (an MLflow ``Experiment``) unless it already
    holds this petra's: an experiment logged by an older petra gets the current view."""
    view, state = view_tag()
    if experiment.tags.get(view) != state:
        client.set_experiment_tag(experiment.experiment_id, view, state)


def runs_url(url: str, experiment_id: str, search_filter: str | None = None,
             **params: str) -> str:
    """The runs page of an experiment in the MLflow 3 UI (model-training mode), optionally
    filtered, with any further query ``params``."""
    query = {"workflowType": "machine_learning", **params}
    if search_filter:
        query["searchFilter"] = search_filter
    return f"{url}/#/experiments/{experiment_id}/runs?" + urllib.parse.urlencode(
        query, quote_via=urllib.parse.quote)


def fronts_url(url: str, experiment_id: str) -> str:
    """The runs page of ``experiment_id`` opened on petra's view, in chart mode."""
    return runs_url(url, experiment_id, **{SHARE_URL_PARAM: FRONTS_VIEW,
                                           "compareRunsMode": "CHART"})
