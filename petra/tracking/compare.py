"""Comparing the fronts of several searches: hypervolumes on a common reference, and where each
front wins.

The searches must share their objectives. Each search's candidates are normalised by its own
dense baseline (bytes and latency become ratios), and one reference point serves them all: for
an accuracy-like objective the lowest of the baselines less 0.1, for the others 1 (the dense
model). Against it :func:`compare` reports

- each search's **hypervolume**;
- **coverage** ``C(A, B)``: the share of B's front that some member of A's front weakly
  dominates (Zitzler's set coverage);
- each search's share of the **combined front** (the non-dominated members of all fronts
  together) and its **exclusive hypervolume**: what the combined front loses without it;
- **bands** of size ratio and of latency ratio: in each, the best accuracy each front reaches
  there, and which search holds it.

:func:`write` renders the result (HTML, PNG, CSV, Markdown, JSON) and :func:`log_comparison`
records it as an MLflow run of its own, linked to the searches it compares.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from petra.engine.pareto import ACCURACY_MARGIN, hypervolume, non_dominated_ranks, normalize
from petra.errors import ConfigError
from petra.space import summarize
from petra.tracking import plots
from petra.tracking.store import Tracker

if TYPE_CHECKING:
    from petra.engine.pareto import FrontSnapshot


#: Band edges of size ratio and latency ratio.
BANDS = {"size_ratio": (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0),
         "latency_ratio": (0.0, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)}
#: The MLflow experiment comparison runs go to, unless told otherwise.
EXPERIMENT = "petra-comparisons"


@dataclass
class Comparison:
    """What :func:`compare` found; every number is recomputable from the candidate runs."""

    labels: list[str]
    run_ids: list[str]
    objectives: list[tuple[str, str]]
    reference: tuple[float, ...]
    fronts: list[Any]  # one FrontSnapshot per search
    hypervolumes: dict[str, float]
    coverage: dict[str, dict[str, float]]
    combined: dict[str, dict[str, float]]
    bands: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    baselines: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "searches": [{"label": lab, "run_id": rid, "baseline": base,
                          "front_size": len(front.members)}
                         for lab, rid, base, front in zip(self.labels, self.run_ids,
                                                          self.baselines, self.fronts,
                                                          strict=True)],
            "objectives": [list(o) for o in self.objectives],
            "reference": list(self.reference),
            "hypervolume": self.hypervolumes,
            "coverage": self.coverage,
            "combined_front": self.combined,
            "bands": self.bands,
        }

    def table(self) -> str:
        """A fixed-width summary: hypervolume, front size, combined-front share per search."""
        lines = [f"{'search':<28} {'hypervolume':>11} {'front':>6} {'on combined':>12} "
                 f"{'exclusive HV':>12}"]
        for label, front in zip(self.labels, self.fronts, strict=True):
            c = self.combined[label]
            lines.append(f"{label:<28} {self.hypervolumes[label]:>11.4f} "
                         f"{len(front.members):>6} {int(c['points']):>12} "
                         f"{c['exclusive_hypervolume']:>12.4f}")
        lines.append("")
        lines.append("coverage C(row, column): share of the column's front the row's dominates")
        width = max(16, *(len(lab) + 2 for lab in self.labels))
        lines.append(" " * 28 + "".join(f"{lab:>{width}}" for lab in self.labels))
        for a in self.labels:
            lines.append(f"{a:<28}" + "".join(
                f"{self.coverage[a][b]:>{width}.2f}" if a != b else f"{'-':>{width}}"
                for b in self.labels))
        for metric, bands in self.bands.items():
            lines.append("")
            lines.append(f"best val_accuracy by {metric} band (winner *, tie =)")
            for band in bands:
                cells = []
                for label in self.labels:
                    acc = band["best"][label]
                    mark = ("*" if label == band["winner"]
                            else "=" if label in band["leaders"] else " ")
                    cells.append(f"{'-' if acc is None else f'{acc:.4f}'}{mark}")
                lo, hi = band[metric]
                lines.append(f"  [{lo:.2f}, {hi:.2f})".ljust(28)
                             + "".join(f"{c:>{width + 1}}" for c in cells))
        return "\n".join(lines)


def common_reference(objectives: Sequence[tuple[str, str]],
                     baselines: Sequence[Mapping[str, float]]) -> tuple[float, ...]:
    """The reference point every search is measured against (see the module docstring)."""

    ref = []
    for metric, direction in objectives:
        if direction == "max":
            ref.append(-(min(float(b[metric]) for b in baselines) - ACCURACY_MARGIN))
        else:
            ref.append(1.0)
    return tuple(ref)


def _normalised(front: FrontSnapshot, objectives: Sequence[tuple[str, str]],
                baseline: Mapping[str, float]) -> np.ndarray:

    points = [normalize(m["metrics"], objectives, baseline) for m in front.members]
    return np.array(points, dtype=float).reshape(-1, len(objectives))


def _weakly_dominated(points: np.ndarray, by: np.ndarray) -> np.ndarray:
    """For each row of ``points``: is some row of ``by`` no worse in every objective?"""
    if len(points) == 0 or len(by) == 0:
        return np.zeros(len(points), dtype=bool)
    return (by[None, :, :] <= points[:, None, :]).all(-1).any(-1)


def compare(searches: Sequence[Any]) -> Comparison:
    """Compare :class:`petra.tracking.runs.SearchRun` fronts on a common reference.

    Raises:
        petra.config.ConfigError: fewer than two searches, or different objectives.
    """

    if len(searches) < 2:
        raise ConfigError("run_ids", [s.run_id for s in searches], "",
                          "compare needs at least two search runs")
    objectives = searches[0].objectives
    for s in searches[1:]:
        if s.objectives != objectives:
            raise ConfigError("objectives", s.run_id, "", (
                f"compare needs the same objectives; {searches[0].label} has "
                f"{[':'.join(o) for o in objectives]}, {s.label} has "
                f"{[':'.join(o) for o in s.objectives]}"))
    labels = _unique([s.label for s in searches])
    fronts = [s.front() for s in searches]
    baselines = [dict(s.baseline) for s in searches]
    ref = common_reference(objectives, baselines)
    points = {lab: _normalised(f, objectives, b)
              for lab, f, b in zip(labels, fronts, baselines, strict=True)}
    hv = {lab: hypervolume(points[lab], ref) for lab in labels}
    coverage = {a: {b: (float(_weakly_dominated(points[b], points[a]).mean())
                        if a != b and len(points[b]) else 0.0)
                    for b in labels} for a in labels}
    union = np.vstack([points[lab] for lab in labels]) if labels else np.empty((0, len(ref)))
    owner = [lab for lab in labels for _ in range(len(points[lab]))]
    ranks = non_dominated_ranks(union) if len(union) else np.array([], dtype=int)
    total = hypervolume(union, ref)
    combined = {}
    for lab in labels:
        others = np.vstack([points[o] for o in labels if o != lab] or [np.empty((0, len(ref)))])
        combined[lab] = {
            "points": float(sum(1 for o, r in zip(owner, ranks, strict=True)
                                if o == lab and r == 0)),
            "exclusive_hypervolume": total - hypervolume(others, ref),
        }
    comparison = Comparison(labels=labels, run_ids=[s.run_id for s in searches],
                            objectives=list(objectives), reference=ref, fronts=fronts,
                            hypervolumes=hv, coverage=coverage, combined=combined,
                            baselines=baselines)
    comparison.bands = {metric: _bands(metric, edges, labels, fronts)
                        for metric, edges in BANDS.items()
                        if all(metric in m["metrics"] for f in fronts for m in f.members)}
    return comparison


def _bands(metric: str, edges: Sequence[float], labels: Sequence[str],
           fronts: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        best: dict[str, float | None] = {}
        for label, front in zip(labels, fronts, strict=True):
            accs = [float(m["metrics"]["val_accuracy"]) for m in front.members
                    if lo <= float(m["metrics"][metric]) < hi
                    and "val_accuracy" in m["metrics"]]
            best[label] = max(accs) if accs else None
        present = {k: v for k, v in best.items() if v is not None}
        top = max(present.values(), default=None)
        leaders = [k for k, v in present.items() if v == top]
        out.append({metric: [lo, hi], "best": best, "leaders": leaders,
                    "winner": leaders[0] if len(leaders) == 1 else None})
    return out


def _unique(labels: Sequence[str]) -> list[str]:
    out, seen = [], {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def write(comparison: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """``compare.html``, ``compare.png``, ``compare.csv``, ``compare.md`` and ``compare.json``."""
    import html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"compare.{name}" for name in ("html", "png", "csv", "md", "json")}
    fronts = list(zip(comparison.labels, comparison.fronts, strict=True))
    baseline = min(comparison.baselines, key=lambda b: b.get("val_accuracy", 0.0))
    summary = f"<pre>{html.escape(comparison.table())}</pre>"
    files["html"].write_text(plots.compare_html(fronts, baseline, summary))
    plots.compare_png(fronts, baseline, files["png"])
    files["csv"].write_text(_csv(comparison))
    files["md"].write_text(_markdown(comparison))
    files["json"].write_text(json.dumps(comparison.to_dict(), indent=2, allow_nan=False))
    return files


def _csv(comparison: Comparison) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = ("val_accuracy", "test_accuracy", "artifact_bytes", "size_ratio", "latency_ratio")
    writer.writerow(["search", "search_run_id", "candidate_run_id", *keys, "recipe"])

    for label, run_id, front in zip(comparison.labels, comparison.run_ids, comparison.fronts,
                                    strict=True):
        for m in front.members:
            writer.writerow([label, run_id, m["id"],
                             *("" if m["metrics"].get(k) is None else m["metrics"][k]
                               for k in keys), summarize(m["genome"], m.get("metrics"))])
    return buf.getvalue()


def _markdown(comparison: Comparison) -> str:
    lines = ["| search | hypervolume | front size | on the combined front | exclusive HV |",
             "|---|---|---|---|---|"]
    for label, front in zip(comparison.labels, comparison.fronts, strict=True):
        c = comparison.combined[label]
        lines.append(f"| {label} | {comparison.hypervolumes[label]:.4f} | "
                     f"{len(front.members)} | {int(c['points'])} | "
                     f"{c['exclusive_hypervolume']:.4f} |")
    ref = ", ".join(f"{m} {r:+.4f}" for (m, _), r in zip(comparison.objectives,
                                                          comparison.reference, strict=True))
    lines += ["", f"Reference point (normalised, minimised): {ref}."]
    return "\n".join(lines) + "\n"


def log_comparison(comparison: Comparison, uri: str, files: Mapping[str, Path],
                   experiment: str = EXPERIMENT) -> str:
    """Record the comparison as an MLflow run linked to its searches; returns its run id."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    tracker = Tracker(uri=uri, experiment=experiment)
    client: MlflowClient = tracker.client
    links = "\n".join(
        f"- [{label}](#/experiments/{client.get_run(rid).info.experiment_id}/runs/{rid}): "
        f"hypervolume {comparison.hypervolumes[label]:.4f}"
        for label, rid in zip(comparison.labels, comparison.run_ids, strict=True))
    run = client.create_run(tracker.experiment_id,
                            run_name="compare " + " vs ".join(comparison.labels), tags={
        "petra.kind": "comparison",
        "petra.compared_runs": ",".join(comparison.run_ids),
        "mlflow.note.content": f"petra compare of {len(comparison.labels)} searches:\n{links}",
    })
    run_id = run.info.run_id
    params = [Param(f"search.{i}.run_id", rid) for i, rid in enumerate(comparison.run_ids)]
    params += [Param(f"search.{i}.label", lab) for i, lab in enumerate(comparison.labels)]
    params.append(Param("reference", json.dumps(list(comparison.reference))))
    params.append(Param("objectives", json.dumps([":".join(o) for o in comparison.objectives])))
    client.log_batch(run_id, params=params, tags=[
        RunTag(f"petra.compared.{i}", rid) for i, rid in enumerate(comparison.run_ids)])
    metrics = {f"hypervolume.{_metric_key(lab)}": v for lab, v in comparison.hypervolumes.items()}
    tracker.log_metrics(run_id, metrics)
    for path in files.values():
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _metric_key(label: str) -> str:
    """An MLflow-safe metric-name part for a search label."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", label).replace("/", "_") or "search"
