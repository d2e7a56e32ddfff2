"""Operating points of a front, picked on validation accuracy and only then read on test.

A user ships one model, not a front. Among the members whose validation accuracy is within
``margin`` of the dense baseline's validation accuracy, three are named:

- ``smallest``: the smallest size ratio (ties: lower latency, then higher accuracy);
- ``fastest``: the lowest latency ratio (ties: smaller size, then higher accuracy);
- ``knee``: the member closest to the ideal point, each of validation accuracy, size and latency
  ratio scaled to [0, 1] over the eligible members (a constant one counts 0), as
  :func:`petra.engine.pareto.knee_point` does over a whole front.

Each is one member, so its size and latency come from the same model. Test accuracy is carried
along to be read and never takes part in the choice: a member's ``test_drop`` is the baseline's
test accuracy minus its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Validation points a member may lose against the baseline and still be eligible.
MARGIN = 0.01
POINTS = ("smallest", "fastest", "knee")


def eligible(members: Sequence[Mapping[str, Any]], baseline_val: float,
             margin: float = MARGIN) -> list[Mapping[str, Any]]:
    """The members (flat metric dicts) whose ``val_accuracy`` is ≥ ``baseline_val - margin``
    and whose size and latency ratios are measured."""
    floor = baseline_val - margin - 1e-12  # a member exactly at the floor is in
    return [m for m in members
            if all(_finite(m.get(k)) for k in ("val_accuracy", "size_ratio", "latency_ratio"))
            and float(m["val_accuracy"]) >= floor]


def operating_points(members: Sequence[Mapping[str, Any]], baseline: Mapping[str, float],
                     margin: float = MARGIN) -> dict[str, dict[str, Any] | None]:
    """``smallest``, ``fastest`` and ``knee`` (see the module docstring) among ``members``
    (flat dicts with ``val_accuracy``, ``size_ratio``, ``latency_ratio`` and, to be read,
    ``test_accuracy``), each with its ``test_drop``; None where no member is eligible.
    ``baseline`` holds the dense model's ``val_accuracy`` and ``test_accuracy``."""
    pool = eligible(members, float(baseline["val_accuracy"]), margin)
    if not pool:
        return dict.fromkeys(POINTS)
    chosen = {
        "smallest": min(pool, key=lambda m: (m["size_ratio"], m["latency_ratio"],
                                             -m["val_accuracy"])),
        "fastest": min(pool, key=lambda m: (m["latency_ratio"], m["size_ratio"],
                                            -m["val_accuracy"])),
        "knee": _knee(pool),
    }
    return {name: _report(m, baseline) for name, m in chosen.items()}


def _knee(pool: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    columns = [[-float(m["val_accuracy"]) for m in pool],
               [float(m["size_ratio"]) for m in pool],
               [float(m["latency_ratio"]) for m in pool]]
    scaled = []
    for column in columns:
        lo, hi = min(column), max(column)
        scaled.append([(v - lo) / (hi - lo) if hi > lo else 0.0 for v in column])
    distances = [math.hypot(*point) for point in zip(*scaled, strict=True)]
    return pool[distances.index(min(distances))]


def _report(member: Mapping[str, Any], baseline: Mapping[str, float]) -> dict[str, Any]:
    out = {k: member.get(k) for k in ("id", "size_ratio", "latency_ratio", "val_accuracy",
                                      "test_accuracy") if k in member}
    test = member.get("test_accuracy")
    base = baseline.get("test_accuracy")
    out["test_drop"] = float(base) - float(test) if _finite(test) and _finite(base) else None
    return out


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
