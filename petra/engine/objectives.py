"""Objectives and constraints: how a candidate's metrics are judged, before any front.

Objectives are ``(metric, direction)`` pairs, ``direction`` being ``"max"`` or ``"min"``, e.g.
``[("val_accuracy", "max"), ("artifact_bytes", "min")]``. Constraints bound the accuracy drop,
the bytes and the latency ratio; an infeasible candidate is told to every strategy through
Deb's constrained domination (:func:`constrained_values`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Objectives = Sequence[tuple[str, str]]

#: The keys that :func:`is_feasible` understands.
CONSTRAINT_KEYS = ("max_accuracy_drop", "max_bytes", "max_latency_ratio")


#: The directions of an objective.
DIRECTIONS: tuple[str, ...] = ("max", "min")


def check_objectives(objectives: Objectives) -> list[tuple[str, str]]:
    """Validate ``(metric, direction)`` pairs; ``"metric:direction"`` strings are accepted too.
    (The config validates its objective strings further: :data:`petra.config.METRICS`.)"""
    out = []
    for objective in objectives:
        if isinstance(objective, str):
            metric, _, direction = (part.strip() for part in objective.partition(":"))
        else:
            metric, direction = objective
        if direction not in DIRECTIONS:
            raise ValueError(
                f"objective {metric!r} direction must be 'max' or 'min'; got {direction!r}"
            )
        out.append((str(metric), str(direction)))
    if not out:
        raise ValueError("objectives must name at least one metric")
    return out


def violation(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    constraints: Mapping[str, float | None] | None,
) -> float:
    """How far ``metrics`` are from meeting ``constraints``: 0 when feasible.

    Each violated constraint adds its relative excess; ``None`` values are ignored:

    - ``max_accuracy_drop``: ``val_accuracy >= baseline["val_accuracy"] - drop``; adds the
      accuracy missing, in points of accuracy (fractions of 1)
    - ``max_bytes``: ``artifact_bytes <= max_bytes``; adds ``bytes / max_bytes - 1``
    - ``max_latency_ratio``: ``latency_ratio <= max_latency_ratio``; adds ``ratio / max - 1``

    A constrained metric that is missing or not finite is an infinite violation.
    """
    if not constraints:
        return 0.0
    unknown = [k for k in constraints if k not in CONSTRAINT_KEYS]
    if unknown:
        raise ValueError(
            f"unknown constraint {unknown[0]!r}; choose from {', '.join(CONSTRAINT_KEYS)}"
        )

    def value(metric: str) -> float:
        v = metrics.get(metric)
        v = math.nan if v is None else float(v)
        return v if math.isfinite(v) else math.nan

    total = 0.0
    drop = constraints.get("max_accuracy_drop")
    if drop is not None:
        if "val_accuracy" not in baseline:
            raise ValueError("max_accuracy_drop needs the baseline's val_accuracy")
        floor = float(baseline["val_accuracy"]) - float(drop)
        acc = value("val_accuracy")
        total += math.inf if math.isnan(acc) else max(0.0, floor - acc)
    for key, metric in (("max_bytes", "artifact_bytes"), ("max_latency_ratio", "latency_ratio")):
        bound = constraints.get(key)
        if bound is not None:
            v = value(metric)
            total += math.inf if math.isnan(v) else max(0.0, v / float(bound) - 1.0)
    return total


def is_feasible(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    constraints: Mapping[str, float | None] | None,
) -> bool:
    """Whether ``metrics`` meet ``constraints`` (see :func:`violation`)."""
    return violation(metrics, baseline, constraints) == 0.0


# Deb's constrained domination through plain objective values, for any strategy: an infeasible
# candidate is told INFEASIBLE_BASE * (1 + violation) in the worst direction of every objective.
# Every feasible candidate dominates it; among infeasible ones the smaller violation dominates;
# failed candidates (told far worse, ~1e18) stay behind all of them.
INFEASIBLE_BASE = 1e9


def constrained_values(
    values: tuple[float, ...] | None,
    objectives: Objectives,
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    constraints: Mapping[str, float | None] | None,
) -> tuple[float, ...] | None:
    """``values`` for a feasible candidate; penalty values for an infeasible one."""
    if values is None:
        return None
    amount = violation(metrics, baseline, constraints)
    if amount == 0.0:
        return values
    penalty = INFEASIBLE_BASE * (1.0 + min(amount, 1e6))
    return tuple(-penalty if d == "max" else penalty for _, d in check_objectives(objectives))
