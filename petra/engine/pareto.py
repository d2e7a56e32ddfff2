"""Non-dominated sorting, hypervolume and the knee point: compute once, render many.

Objectives and constraints are judged in :mod:`petra.engine.objectives` (re-exported here).

:func:`snapshot` turns the search's records into a :class:`FrontSnapshot`, which tracking, the
plots and the CLI all consume. Objectives are ``(metric, direction)`` pairs, ``direction`` being
``"max"`` or ``"min"``, e.g. ``[("val_accuracy", "max"), ("artifact_bytes", "min")]``.

Dominance is decided in each objective's own units (it does not change under the positive
rescaling of :func:`normalize`); the hypervolume is measured in the normalised space, so that it
is comparable across tasks and models.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from petra.engine.objectives import (  # noqa: F401  (re-exported)
    CONSTRAINT_KEYS,
    DIRECTIONS,
    INFEASIBLE_BASE,
    Objectives,
    check_objectives,
    constrained_values,
    is_feasible,
    violation,
)
from petra.errors import COMPLETE, FAILED, PRUNED, STATUSES

#: "min" metrics that are already ratios to the dense baseline (the baseline's value is 1.0).
RATIO_METRICS = frozenset({"latency_ratio", "size_ratio"})
#: The accuracy margin below the baseline that still counts for hypervolume.
ACCURACY_MARGIN = 0.1
def non_dominated_ranks(points: np.ndarray) -> np.ndarray:
    """The Pareto rank of each row of ``points`` (all objectives minimised).

    Rank 0 is the first front (no other point dominates it), rank 1 the front once rank 0 is
    removed, and so on. Equal points share a rank. Rows with NaN neither dominate nor are
    dominated; drop them first if that is not what you want.

    Args:
        points: an ``(n, k)`` array.

    Returns:
        An ``(n,)`` integer array.
    """
    p = np.asarray(points, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"points must be a 2-D array (n, objectives); got shape {p.shape}")
    n = p.shape[0]
    ranks = np.full(n, -1, dtype=int)
    if n == 0:
        return ranks
    # dominates[i, j]: i is no worse than j everywhere and better somewhere.
    dominates = (p[:, None, :] <= p[None, :, :]).all(-1) & (p[:, None, :] < p[None, :, :]).any(-1)
    counts = dominates.sum(axis=0)
    remaining = np.ones(n, dtype=bool)
    rank = 0
    while remaining.any():
        front = remaining & (counts == 0)
        ranks[front] = rank
        counts = counts - dominates[front].sum(axis=0)
        remaining &= ~front
        rank += 1
    return ranks


def to_minimization(values: Sequence[Mapping[str, float]], objectives: Objectives) -> np.ndarray:
    """An ``(n, k)`` array of the objectives in minimisation form: "max" objectives negated.

    A metric missing from a mapping becomes NaN.
    """
    objectives = check_objectives(objectives)
    out = np.empty((len(values), len(objectives)), dtype=float)
    for i, metrics in enumerate(values):
        for j, (metric, direction) in enumerate(objectives):
            v = metrics.get(metric)
            v = math.nan if v is None else float(v)
            out[i, j] = -v if direction == "max" else v
    return out


def _baseline_value(metric: str, baseline: Mapping[str, float]) -> float:
    if metric in RATIO_METRICS:
        return 1.0
    if metric not in baseline:
        raise ValueError(f"the baseline has no {metric!r}; it has {', '.join(baseline)}")
    value = float(baseline[metric])
    if not value > 0:
        raise ValueError(f"the baseline's {metric!r} must be positive to normalise; got {value}")
    return value


def normalize(
    metrics: Mapping[str, float], objectives: Objectives, baseline: Mapping[str, float]
) -> tuple[float, ...]:
    """One candidate's objectives in the normalised minimisation space used for hypervolume.

    - A "max" objective (accuracy-like, in [0, 1]) becomes ``-metrics[m]``; its reference is
      ``-(baseline[m] - 0.1)``, so candidates up to 0.1 below the baseline still count.
    - A "min" objective becomes its ratio to the baseline's value; its reference is 1.0, so only
      candidates smaller (faster) than the baseline count. ``latency_ratio`` and ``size_ratio``
      are already ratios (baseline value 1.0); others (``artifact_bytes``, ``latency_ms``,
      ``params``, ``macs``, ...) are divided by ``baseline[m]``.

    A missing metric becomes NaN. See :func:`reference_point` for the matching reference.
    """
    out = []
    for metric, direction in check_objectives(objectives):
        v = metrics.get(metric)
        v = math.nan if v is None else float(v)
        out.append(-v if direction == "max" else v / _baseline_value(metric, baseline))
    return tuple(out)


def reference_point(objectives: Objectives, baseline: Mapping[str, float]) -> tuple[float, ...]:
    """The hypervolume reference matching :func:`normalize`."""
    out = []
    for metric, direction in check_objectives(objectives):
        if direction == "max":
            if metric not in baseline:
                raise ValueError(f"the baseline has no {metric!r}; it has {', '.join(baseline)}")
            out.append(-(float(baseline[metric]) - ACCURACY_MARGIN))
        else:
            out.append(1.0)
    return tuple(out)


def hypervolume(points_min: np.ndarray, ref: Sequence[float]) -> float:
    """The hypervolume dominated by ``points_min`` (minimised) and bounded by ``ref``.

    Points that are not strictly better than ``ref`` in every coordinate, or not finite, are
    dropped first; with none left the hypervolume is 0.0.
    """
    import moocore

    ref_arr = np.asarray(ref, dtype=float)
    p = np.asarray(points_min, dtype=float).reshape(-1, ref_arr.size)
    p = p[np.isfinite(p).all(axis=1) & (p < ref_arr).all(axis=1)]
    if len(p) == 0:
        return 0.0
    return float(moocore.hypervolume(p, ref=ref_arr))


def _plain(value: Any) -> Any:
    """JSON-safe scalars: numpy types to Python, non-finite floats to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class FrontSnapshot:
    """The non-dominated, feasible, complete candidates after one generation.

    Attributes:
        generation: the generation this snapshot was taken after.
        objectives: ``(metric, direction)`` pairs.
        members: one dict per front member, ``{"id", "genome", "metrics", "rank": 0}``, sorted
            best-first on the first objective.
        hypervolume: of the whole front, in the space of :func:`normalize`.
        reference: the hypervolume reference, from :func:`reference_point`.
        evaluated: every record seen so far, whatever its status.
        failed: the records with status "failed".
        pruned: the records with status "pruned" (stopped by their multi-fidelity rung).
    """

    generation: int
    objectives: list[tuple[str, str]]
    members: list[dict[str, Any]]
    hypervolume: float
    reference: tuple[float, ...]
    evaluated: int
    failed: int
    pruned: int = 0

    @property
    def ids(self) -> list[str]:
        return [m["id"] for m in self.members]

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "objectives": [list(o) for o in self.objectives],
            "hypervolume": _plain(float(self.hypervolume)),
            "reference": [_plain(float(r)) for r in self.reference],
            "evaluated": self.evaluated,
            "failed": self.failed,
            "pruned": self.pruned,
            "members": [
                {
                    "id": m["id"],
                    "genome": {k: _plain(v) for k, v in m["genome"].items()},
                    "metrics": {k: _plain(v) for k, v in m["metrics"].items()},
                    "rank": m.get("rank", 0),
                }
                for m in self.members
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> FrontSnapshot:
        d = json.loads(text)
        return cls(
            generation=int(d["generation"]),
            objectives=[(str(m), str(o)) for m, o in d["objectives"]],
            members=list(d["members"]),
            hypervolume=float(d["hypervolume"] or 0.0),
            reference=tuple(float(r) for r in d["reference"]),
            evaluated=int(d["evaluated"]),
            failed=int(d["failed"]),
            pruned=int(d.get("pruned", 0)),
        )

    def to_csv(self) -> str:
        """One row per member: id, the objectives, every other metric, then ``gene:<name>``."""
        objective_names = [m for m, _ in self.objectives]
        other: list[str] = []
        genes: list[str] = []
        for m in self.members:
            other += [k for k in m["metrics"] if k not in objective_names and k not in other]
            genes += [k for k in m["genome"] if k not in genes]
        header = ["id", *objective_names, *other, *(f"gene:{g}" for g in genes)]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for m in self.members:
            row = [m["id"]]
            row += [_cell(m["metrics"].get(k)) for k in (*objective_names, *other)]
            row += [_cell(m["genome"].get(g)) for g in genes]
            writer.writerow(row)
        return buf.getvalue()

    def table(self, max_rows: int = 20) -> str:
        """A fixed-width text table: id, each objective, size_ratio and latency_ratio if present."""
        columns = [m for m, _ in self.objectives]
        for extra in ("size_ratio", "latency_ratio"):
            if extra not in columns and any(extra in m["metrics"] for m in self.members):
                columns.append(extra)
        rows = [
            [str(m["id"]), *(_fmt(m["metrics"].get(c)) for c in columns)]
            for m in self.members[:max_rows]
        ]
        header = ["id", *columns]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest]).rstrip()

        out = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
        if len(self.members) > max_rows:
            out.append(f"... {len(self.members) - max_rows} more")
        if not self.members:
            out.append("(empty front)")
        return "\n".join(out)


def _cell(value: Any) -> str:
    value = _plain(value)
    return "" if value is None else str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if v.is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _eligible(records: Sequence[Mapping[str, Any]], objectives: Objectives,
              baseline: Mapping[str, float], constraints: Mapping[str, float | None] | None
              ) -> list[Mapping[str, Any]]:
    """The records that may stand on the front: complete, finite in every objective, feasible.

    Raises:
        ValueError: a record's status is not one of :data:`petra.errors.STATUSES`.
    """
    out = []
    for record in records:
        status = record.get("status")
        if status not in STATUSES:
            raise ValueError(f"record status must be one of {list(STATUSES)}; got {status!r}")
        metrics = record.get("metrics") or {}
        if status != COMPLETE:
            continue
        values = [metrics.get(m) for m, _ in objectives]
        if not any(v is None or not math.isfinite(float(v)) for v in values) and is_feasible(
                metrics, baseline, constraints):
            out.append(record)
    return out


def snapshot(
    records: Sequence[Mapping[str, Any]],
    objectives: Objectives,
    baseline: Mapping[str, float],
    generation: int,
    constraints: Mapping[str, float | None] | None = None,
) -> FrontSnapshot:
    """The front of ``records``: complete, finite in every objective, feasible, non-dominated.

    Args:
        records: dicts ``{"id", "genome", "metrics", "status"}``, status one of
            "complete", "failed", "pruned".
        objectives: ``(metric, direction)`` pairs.
        baseline: the dense baseline's metrics (for normalisation and ``max_accuracy_drop``).
        generation: stored on the snapshot.
        constraints: optional ``max_accuracy_drop``, ``max_bytes``, ``max_latency_ratio``;
            ``None`` values are ignored. Infeasible candidates never sit on the front.
    """
    objectives = check_objectives(objectives)
    if constraints is not None and hasattr(constraints, "model_dump"):
        constraints = constraints.model_dump()
    candidates = _eligible(records, objectives, baseline, constraints)
    members: list[dict[str, Any]] = []
    hv = 0.0
    ref = reference_point(objectives, baseline)
    if candidates:
        points = to_minimization([c["metrics"] for c in candidates], objectives)
        ranks = non_dominated_ranks(points)
        order = sorted(
            np.flatnonzero(ranks == 0), key=lambda i: (points[i, 0], str(candidates[i]["id"]))
        )
        members = [
            {
                "id": str(candidates[i]["id"]),
                "genome": dict(candidates[i].get("genome") or {}),
                "metrics": {k: _plain(v) for k, v in candidates[i]["metrics"].items()},
                "rank": 0,
            }
            for i in order
        ]
        normalised = np.array([normalize(m["metrics"], objectives, baseline) for m in members])
        hv = hypervolume(normalised, ref)
    return FrontSnapshot(
        generation=int(generation),
        objectives=objectives,
        members=members,
        hypervolume=hv,
        reference=ref,
        evaluated=len(records),
        failed=sum(1 for r in records if r.get("status") == FAILED),
        pruned=sum(1 for r in records if r.get("status") == PRUNED),
    )


def hypervolume_curve(
    records: Sequence[Mapping[str, Any]],
    objectives: Objectives,
    baseline: Mapping[str, float],
    constraints: Mapping[str, float | None] | None = None,
) -> list[float]:
    """The hypervolume of the front of the first ``k`` records, for ``k = 1 .. len(records)``.

    ``records`` are in the order they were evaluated; the curve never decreases.
    """
    objectives = check_objectives(objectives)
    ref = reference_point(objectives, baseline)
    curve, points = [], []
    for record in records:
        metrics = record.get("metrics") or {}
        if record.get("status") == COMPLETE and is_feasible(metrics, baseline, constraints):
            point = normalize(metrics, objectives, baseline)
            if all(math.isfinite(v) for v in point):
                points.append(point)
        curve.append(hypervolume(np.array(points), ref) if points else 0.0)
    return curve


def evaluations_to_reach(curve: Sequence[float], fraction: float = 0.95) -> int | None:
    """The number of evaluations after which ``curve`` first reaches ``fraction`` of its end."""
    if not curve or curve[-1] <= 0:
        return None
    target = fraction * curve[-1]
    return next(i + 1 for i, v in enumerate(curve) if v >= target)


def knee_point(snapshot: FrontSnapshot) -> str | None:
    """The id of the front member closest to the ideal point, or None for an empty front.

    Each objective is min-max normalised over the front to [0, 1] in minimisation form (an
    objective constant across the front contributes 0), and the member with the smallest
    Euclidean distance to the ideal point (the origin) is the knee: the most balanced
    compromise. Ties go to the first member in the snapshot's order. The knee is one of the
    members whose accuracy-like objectives are within :data:`ACCURACY_MARGIN` of the
    baseline's (those the hypervolume counts), where any is: a front that holds a tiny model
    of no accuracy would otherwise offer it as the compromise.
    """
    members = snapshot.members
    if not members:
        return None
    points = to_minimization([m["metrics"] for m in members], snapshot.objectives)
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    distance = np.linalg.norm((points - lo) / span, axis=1)
    accurate = [j for j, (_, direction) in enumerate(snapshot.objectives) if direction == "max"]
    within = np.all(points[:, accurate] <= np.asarray(snapshot.reference)[accurate], axis=1)
    if within.any():
        distance = np.where(within, distance, np.inf)
    return str(members[int(np.argmin(distance))]["id"])
