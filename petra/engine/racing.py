"""Racing: many offspring read at tier 0, only the promising ones measured.

Each generation with racing on (``search.racing``), the strategy proposes ``factor`` times the
population. Every offspring is screened at tier 0 (:mod:`petra.candidate.screen`: milliseconds
to seconds, in torch), and :class:`Calibration` turns its reading into predicted objectives,
learned from the search's own measured (tier-2) candidates:

- **validation accuracy**: the distance-weighted mean of the ``K`` measured candidates nearest
  in (tier-0 divergence, fine-tune epochs, MACs ratio), on log scales, standardized;
- **size ratio**: the tier-0 estimate times the median measured/estimated ratio of the measured
  candidates with the same weight format;
- **latency ratio**: the per-layer latency table's estimate ``t``
  (:mod:`petra.candidate.latency_table`) corrected by the measured candidates, once
  :data:`TABLE_SAME_SCHEME` of them share the candidate's quantization scheme (the table's
  own estimate until then): ``a + b_scheme * t`` (:func:`table_latency`), least squares on
  relative errors over every measured candidate, one slope per scheme (schemes differ too much
  to share one) and one fixed cost ``a`` for all. What the table leaves out, the runtime's cost
  per call and the small operations around the weight layers, does not shrink with the layers:
  a ratio alone scaled it away, and missed text_bert's near-empty candidates by 50-80%. Where a
  layer could not be timed alone, ``exp(a) * macs_ratio ** b``, least squares in
  logs over the measured candidates of the scheme (pooled while it has fewer than four).

How many offspring are screened (:func:`screen_count`): ``factor`` times the population at
most, and no more than screening in ``screen_share`` of the time measuring a population takes,
at the search's median screen and evaluation times so far (a screen's first timings of new
layer shapes left out: each shape is timed once per search). Where a full evaluation costs a few
screens (a small model, a short fine-tune), screening all ``factor`` x population would cost
more measured candidates than it could pick well. Under a time budget, the generation it would
cut short is sized to the time left: fewer measured, and their screening to match.

A candidate goes on to the measured evaluation only when no member of the measured front
dominates its optimistic prediction on the search's objectives (accuracy plus the
calibration's own error, sizes and latencies less theirs), and then at most ``population`` of
them, in non-dominated order of their predictions, and measured best first. Nothing predicted
stands on a front: the front, and every objective it shows, come from measured candidates
only. Screened-out candidates are recorded with status ``pruned`` and tag ``petra.tier=0``,
with their tier-0 reading and the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from petra.engine.pareto import hypervolume, non_dominated_ranks
from petra.errors import COMPLETE, PRUNED

#: Neighbours of the accuracy prediction. Replayed over the measured candidates of the ten racing
#: searches of digits_cnn's tuning seeds 0-2 (each predicted from those measured before it),
#: K = 3, 4, 5, 6, 7, 8, 10 ranked the measured accuracy at Spearman 0.81, 0.82, 0.84, 0.84,
#: 0.84, 0.82, 0.80: 5 is the smallest of the plateau (3 had ranked better on 40 random genomes).
K = 5
#: Measured candidates needed before any is screened out.
MIN_OBSERVED = 8
#: Measured candidates of a scheme before the latency table's estimates for it are corrected by
#: their median measured/estimated ratio (the raw estimate until then).
TABLE_SAME_SCHEME = 2
#: How the table's estimates are corrected once a scheme has :data:`TABLE_FIT_FROM` measured
#: candidates (:func:`table_latency`): ``ratio``, ``affine``, ``shared`` or ``power``. Replayed
#: over the measured candidates of racing searches on tuning seeds 0 and 1 (each predicted from
#: those measured before it; ``benchmarks/latency_replay.py``), the median errors of ratio,
#: affine, shared and power were 13.1, 9.1, 8.7 and 7.7% (text_bert seed 0), 11.3, 9.0, 8.3 and
#: 10.8% (seed 1), 4.6, 4.9, 4.8, 4.7% and 6.1, 7.0, 7.1, 7.6% (digits_cnn 0 and 1): shared,
#: from 2, has the lowest mean (7.7% against ratio's 9.2%).
TABLE_FORM = "shared"
TABLE_FIT_FROM = 2
#: Each prediction's error is taken as at least this (accuracy points; relative for ratios).
MIN_MARGIN = 0.01


@dataclass
class Calibration:
    """Tier-0 readings mapped to measured objectives, learned as measurements arrive."""

    observed: list[dict[str, Any]] = field(default_factory=list)

    def observe(self, genome: Mapping[str, Any], tier0: Mapping[str, float],
                measured: Mapping[str, float]) -> None:
        """Take in one measured candidate with the tier-0 reading it had."""
        needed = ("val_accuracy", "size_ratio", "latency_ratio")
        if all(math.isfinite(float(measured.get(k, math.nan))) for k in needed):
            self.observed.append({"features": features(genome, tier0),
                                  "scheme": str(genome.get("quant.scheme", "none")),
                                  "tier0": dict(tier0),
                                  **{k: float(measured[k]) for k in needed}})

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> Calibration:
        """The calibration a search's measured records teach (for resume): those that carry
        their tier-0 reading, in order."""
        out = cls()
        for r in records:
            if r["status"] == COMPLETE and "tier0_divergence" in r["metrics"]:
                out.observe(r["genome"], r["metrics"], r["metrics"])
        return out

    @property
    def ready(self) -> bool:
        return len(self.observed) >= MIN_OBSERVED

    def predict(self, genome: Mapping[str, Any], tier0: Mapping[str, float]
                ) -> dict[str, float]:
        """Predicted val_accuracy, size_ratio and latency_ratio of a screened candidate."""
        return _predict(self.observed, str(genome.get("quant.scheme", "none")),
                        features(genome, tier0), tier0)

    def errors(self) -> dict[str, float]:
        """The leave-one-out median absolute error of each prediction (accuracy in points,
        ratios relative), at least :data:`MIN_MARGIN`."""
        out: dict[str, list[float]] = {"val_accuracy": [], "size_ratio": [],
                                       "latency_ratio": []}
        for i, o in enumerate(self.observed):
            rest = self.observed[:i] + self.observed[i + 1:]
            guess = _predict(rest, o["scheme"], o["features"], o["tier0"])
            out["val_accuracy"].append(abs(guess["val_accuracy"] - o["val_accuracy"]))
            for k in ("size_ratio", "latency_ratio"):
                out[k].append(abs(guess[k] / o[k] - 1))
        return {k: max(MIN_MARGIN, float(np.median(v))) if v else math.inf
                for k, v in out.items()}


def screen_count(records: Sequence[Mapping[str, Any]], population: int, factor: int,
                 share: float | None, deadline: float | None = None, workers: int = 1,
                 ) -> tuple[int, int]:
    """How many offspring to screen this generation, and how many of them to measure.

    Measured: ``population``, or, before a budget's ``deadline`` (a :func:`time.monotonic`
    time), only as many as the time left on ``workers`` can measure together with their
    screening, at the median ``eval_time_s`` so far, and never fewer than ``workers`` (a
    generation that measures fewer leaves a worker idle while it runs: on text_bert, at
    f4eafd1, three generations at the end of a 780 s search each measured one candidate while
    the other worker waited 7-8 s). Screened: ``factor * population``, less where screening
    them would take more than ``share`` of the time that measuring those takes, at the median
    screen and evaluation times of the ``records`` so far; never fewer than are measured.
    ``share`` None, or no times yet, screens ``factor * population``.

    The budget's last generation is sized to the time left: at 180 s on digits_cnn, racing's
    last generation had screened 125 or 240 offspring when the budget ran out, and measured
    none (:func:`survivors` hands them over best first, so a generation cut short still
    measures its most promising). A screen's cost is its ``tier0_time_s`` less its
    ``tier0_table_s``: the first timing of a layer shape for the latency table is paid once
    per search, however many screens follow, and on digits_cnn it made the first generation's
    screens 5-7 times as slow as the third's (median 0.24 s against 0.04 s), which sized the
    second generation's screening to a third of what its own screens then cost.
    """
    most = population * factor
    screens = [max(float(r["metrics"]["tier0_time_s"])
                   - float(r["metrics"].get("tier0_table_s", 0.0)), 0.0) for r in records
               if math.isfinite(float(r["metrics"].get("tier0_time_s", math.nan)))]
    evals = [float(r["metrics"]["eval_time_s"]) for r in records
             if r["status"] == COMPLETE and "latency_ms" in r["metrics"]
             and math.isfinite(float(r["metrics"].get("eval_time_s", math.nan)))]
    if not evals:
        return most, population
    evaluation = float(np.median(evals))
    measured = population
    if deadline is not None:
        left = max(deadline - time.monotonic(), 0.0)
        fits = left * workers / (evaluation * (1 + (share or 0.0)))
        measured = int(min(population, max(workers, 1, math.floor(fits))))
    if share is None or not screens:
        return most, measured
    affordable = share * measured * evaluation / max(float(np.median(screens)), 1e-6)
    return int(min(most, max(measured, math.floor(affordable)))), measured


def _predict(rows: Sequence[Mapping[str, Any]], scheme: str, x: Sequence[float],
             tier0: Mapping[str, float]) -> dict[str, float]:
    return {"val_accuracy": _knn(rows, x), "size_ratio": _size(rows, scheme, tier0),
            "latency_ratio": _latency(rows, scheme, tier0)}


def features(genome: Mapping[str, Any], tier0: Mapping[str, float]) -> tuple[float, ...]:
    """What the accuracy prediction compares: the damage before the fine-tune, how long the
    fine-tune is to repair it, and how much of the model is left (all on log scales; on
    digits_cnn's tuning seeds 0 and 1 these ranked best of seven feature sets, Spearman 0.80
    and 0.72 against the measured accuracy, predicted as in a search)."""
    return (math.log1p(max(float(tier0["tier0_divergence"]), 0.0)),
            math.log1p(float(genome.get("finetune.epochs", 0) or 0)),
            math.log(max(float(tier0["tier0_macs_ratio"]), 1e-6)))


def _knn(rows: Sequence[Mapping[str, Any]], x: Sequence[float]) -> float:
    if not rows:
        return math.nan
    data = np.array([r["features"] for r in rows], dtype=float)
    scale = data.std(axis=0)
    scale[scale == 0] = 1.0
    dist = np.sqrt((((data - np.asarray(x)) / scale) ** 2).sum(axis=1))
    near = np.argsort(dist, kind="stable")[:K]
    weights = 1.0 / (dist[near] + 1e-6)
    values = np.array([rows[i]["val_accuracy"] for i in near])
    return float((weights * values).sum() / weights.sum())


def _size(rows: Sequence[Mapping[str, Any]], scheme: str, tier0: Mapping[str, float]) -> float:
    same = [r for r in rows if r["scheme"] == scheme] or list(rows)
    factor = float(np.median([r["size_ratio"] / r["tier0"]["tier0_size_ratio"] for r in same])) \
        if same else 1.0
    return float(tier0["tier0_size_ratio"]) * factor


def _latency(rows: Sequence[Mapping[str, Any]], scheme: str, tier0: Mapping[str, float]
             ) -> float:
    table = float(tier0.get("tier0_latency_ratio", math.nan))
    if math.isfinite(table) and table > 0:
        seen = [(r["scheme"], r["tier0"]["tier0_latency_ratio"], r["latency_ratio"])
                for r in rows if math.isfinite(r["tier0"].get("tier0_latency_ratio", math.nan))]
        return table_latency(seen, scheme, table)
    return _macs_latency(rows, scheme, tier0)


def table_latency(seen: Sequence[tuple[str, float, float]], scheme: str, table: float,
                  form: str = TABLE_FORM, fit_from: float = TABLE_FIT_FROM) -> float:
    """The latency ratio of a ``scheme`` candidate whose layer table reads ``table``, corrected
    by the measured candidates ``seen`` (scheme, table, measured ratio).

    Fewer than :data:`TABLE_SAME_SCHEME` of them with its scheme: ``table`` itself. Then
    ``table`` times their median measured/table ratio, until ``fit_from`` of them: then, by
    ``form``, ``a + b * table`` fitted to them by least squares on relative errors with
    ``a >= 0`` (``affine``); ``a + b_scheme * table`` fitted the same way to every scheme's at
    once, ``a`` shared (``shared``); or ``c * table ** b`` fitted to them in logs (``power``).
    Each carries what a ratio alone scales away: the runtime's cost per call and the small
    operations around the weight layers, which the table does not time, are a larger share of a
    smaller candidate's time (text_bert's that skip most blocks run at 0.005-0.02 of the dense
    model, whatever their scheme)."""
    pairs = [(t, m) for s, t, m in seen if s == scheme]
    if len(pairs) < TABLE_SAME_SCHEME:
        return table
    ratio = table * float(np.median([m / t for t, m in pairs]))
    if form == "ratio" or len(pairs) < fit_from:
        return ratio
    if form == "power":
        fitted = _power_law([t for t, _ in pairs], [m for _, m in pairs], table)
        return ratio if fitted is None else fitted
    fit = _relative_affine(seen if form == "shared" else [x for x in seen if x[0] == scheme])
    if fit is None or not fit[1].get(scheme, 0.0) > 0:
        return ratio
    return float(fit[0] + fit[1][scheme] * table)


def _relative_affine(seen: Sequence[tuple[str, float, float]]
                     ) -> tuple[float, dict[str, float]] | None:
    """``(a, {scheme: b})`` minimizing the squared relative errors of ``a + b_scheme * table``
    against the measured ratios, with ``a >= 0`` (0 and a line through the origin per scheme
    where the best ``a`` is negative); None when the fit is degenerate."""
    schemes = sorted({s for s, _, _ in seen})
    m = np.array([x for _, _, x in seen])
    cols = [1.0 / m] + [np.array([t if s == k else 0.0 for s, t, _ in seen]) / m
                        for k in schemes]
    coef, *_ = np.linalg.lstsq(np.stack(cols, axis=1), np.ones(len(seen)), rcond=None)
    a, slopes = float(coef[0]), coef[1:]
    if a < 0:
        a = 0.0
        slopes = [float(c.sum() / (c @ c)) if (c @ c) > 0 else math.nan for c in cols[1:]]
    if not math.isfinite(a) or not all(map(math.isfinite, slopes)):
        return None
    return a, dict(zip(schemes, map(float, slopes), strict=True))


def _macs_latency(rows: Sequence[Mapping[str, Any]], scheme: str, tier0: Mapping[str, float]
                  ) -> float:
    same = [r for r in rows if r["scheme"] == scheme]
    use = same if len(same) >= 4 else list(rows)
    macs = max(float(tier0["tier0_macs_ratio"]), 1e-6)
    if len(use) < 3:
        return macs
    ys = [r["latency_ratio"] for r in use]
    fitted = _power_law([max(r["tier0"]["tier0_macs_ratio"], 1e-6) for r in use], ys, macs)
    return float(np.exp(np.median(np.log(ys)))) if fitted is None else fitted


def _power_law(xs: Sequence[float], ys: Sequence[float], at: float) -> float | None:
    """``c * at ** b``, with ``c`` and ``b`` fitted by least squares in logs to the points
    (``xs``, ``ys``); None where the ``xs`` are all equal (no slope to fit)."""
    x, y = np.log(xs), np.log(ys)
    if np.ptp(x) == 0:
        return None
    b, a = np.polyfit(x, y, 1)
    return float(np.exp(a + b * math.log(at)))


#: The objective metrics racing predicts, and the prediction each is ranked by: bytes and
#: milliseconds order candidates as their ratios to the same baseline do.
PREDICTED = {"val_accuracy": "val_accuracy", "size_ratio": "size_ratio",
             "artifact_bytes": "size_ratio", "latency_ratio": "latency_ratio",
             "latency_ms": "latency_ratio"}
#: The search's objectives when none are given.
DEFAULT_OBJECTIVES = (("val_accuracy", "max"), ("artifact_bytes", "min"),
                      ("latency_ratio", "min"))


def survivors(predictions: Sequence[Mapping[str, float]], front: Sequence[Mapping[str, float]],
              errors: Mapping[str, float], keep: int,
              objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES,
              reference: Sequence[float] | None = None,
              ) -> tuple[list[int], dict[int, str]]:
    """Which screened candidates go on to be measured: the indices kept, best first, and the
    reason each other one was screened out.

    A candidate whose optimistic prediction a measured ``front`` member dominates, on the
    search's ``objectives``, is out. Where an objective is one racing does not predict
    (``params``, ``macs``), nothing is screened out that way. Of the rest, at most ``keep`` go
    on: in non-dominated order of their predictions on the predicted objectives (ties in input
    order), or, given the hypervolume ``reference`` (:func:`petra.engine.pareto.reference_point`,
    on the ratios racing predicts), greedily by the hypervolume each one's optimistic
    prediction adds to the front and to those already taken (:func:`_by_hypervolume_gain`).
    """
    keys = [(PREDICTED[m], d) for m, d in objectives if m in PREDICTED]
    comparable = len(keys) == len(objectives)
    reasons: dict[int, str] = {}
    open_: list[int] = []
    hopes: dict[int, list[float]] = {}
    members = [[_minimized(m[k], d) for k, d in keys] for m in front]
    for i, p in enumerate(predictions):
        hope = hopes[i] = [_optimistic(p[k], errors[k], k, d) for k, d in keys]
        beaten = comparable and any(_dominates(member, hope) for member in members)
        if beaten:
            reasons[i] = (f"tier 0: predicted val {p['val_accuracy']:.3f}, size "
                          f"{p['size_ratio']:.3f}, latency {p['latency_ratio']:.3f} is "
                          "dominated by the front even with the calibration's error")
        else:
            open_.append(i)
    if open_:  # best first, so that a generation the budget cuts short measures its best
        points = np.array([[_minimized(predictions[i][k], d) for k, d in keys] for i in open_])
        ranks = non_dominated_ranks(points) if keys else [0] * len(open_)
        order = sorted(range(len(open_)), key=lambda j: (ranks[j], j))
        if reference is not None and comparable and keys:
            order = _by_hypervolume_gain([hopes[i] for i in open_], members, reference, order)
        for j in order[keep:]:
            reasons[open_[j]] = (f"tier 0: not among the {keep} best predictions of this "
                                 "generation")
        open_ = [open_[j] for j in order[:keep]]
    return open_, reasons


def _by_hypervolume_gain(hopes: Sequence[Sequence[float]], front: Sequence[Sequence[float]],
                         reference: Sequence[float], order: Sequence[int]) -> list[int]:
    """``order`` (indices of ``hopes``) rearranged greedily: first the hope that adds the most
    hypervolume to ``front`` (all minimized, bounded by ``reference``), then the one that adds
    the most to the front and the first, and so on; once none adds any, the rest in ``order``.
    Each pick's gain counts what the picks before it already cover, so a second candidate
    predicted where a first was goes after one predicted elsewhere."""
    base = [list(m) for m in front]
    left, picked = list(order), []
    covered = hypervolume(np.array(base), reference) if base else 0.0
    while left:
        gains = [hypervolume(np.array([*base, list(hopes[j])]), reference) - covered
                 for j in left]
        best = int(np.argmax(gains))  # the first of equal gains, in ``order``
        if gains[best] <= 0.0:
            break
        j = left.pop(best)
        picked.append(j)
        base.append(list(hopes[j]))
        covered += gains[best]
    return picked + left


def _minimized(value: float, direction: str) -> float:
    return -value if direction == "max" else value


def _optimistic(value: float, error: float, key: str, direction: str) -> float:
    """The prediction moved by its error in the objective's favour (accuracy in points, the
    ratios relatively), as a value to minimize."""
    better = +1 if direction == "max" else -1
    moved = value + better * error if key == "val_accuracy" else value * (1 + better * error)
    return _minimized(moved, direction)


def _dominates(member: Sequence[float], hope: Sequence[float]) -> bool:
    """Whether ``member`` dominates ``hope`` (both minimized)."""
    return all(a <= b for a, b in zip(member, hope, strict=True)) and list(member) != list(hope)


def race(executor: Any, jobs: Sequence[Any], calibration: Calibration,
         front: Sequence[Mapping[str, float]], keep: int,
         objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES,
         deadline: float | None = None, reference: Sequence[float] | None = None,
         ) -> tuple[list[Any], list[Any]]:
    """Screen ``jobs`` at tier 0 on ``executor``; returns the jobs to measure (each with its
    tier-0 reading in ``tier0``) and the ``(job, result)`` pairs screened out, whose results are
    ``pruned`` with the reason. Before the calibration is :attr:`~Calibration.ready`, the tier-0
    numbers themselves are ranked (divergence for accuracy, the estimates for size and MACs for
    latency) and nothing is compared with the front; once it is, a hypervolume ``reference``
    orders the candidates kept by the hypervolume they are predicted to add (see
    :func:`survivors`). Jobs not screened by ``deadline`` (a
    :func:`time.monotonic` time) are left out of both lists."""
    readings = {job.genome_hash: result for job, result in
                executor.run([replace(job, tier=0) for job in jobs], deadline=deadline)}
    jobs = [job for job in jobs if job.genome_hash in readings]
    ok = [job for job in jobs if readings[job.genome_hash].status == COMPLETE]
    if calibration.ready:
        predictions = [calibration.predict(job.genome, readings[job.genome_hash].metrics)
                       for job in ok]
        errors = calibration.errors()
    else:
        predictions = [{"val_accuracy": -r["tier0_divergence"],
                        "size_ratio": r["tier0_size_ratio"], "latency_ratio": r["tier0_macs_ratio"]}
                       for r in (readings[job.genome_hash].metrics for job in ok)]
        errors, front = {"val_accuracy": 0.0, "size_ratio": 0.0, "latency_ratio": 0.0}, ()
        reference = None  # the raw tier-0 numbers are not the objectives' ratios
    kept, reasons = survivors(predictions, front, errors, keep, objectives, reference)
    predicted = [{f"tier0_predicted_{k}": v for k, v in p.items()} if calibration.ready else {}
                 for p in predictions]
    # what a measured candidate was predicted to be travels with it, so the predictions'
    # errors can be read off the measured records
    measured = [replace(ok[i], tier0={**readings[ok[i].genome_hash].metrics, **predicted[i]})
                for i in kept]
    # A job whose screen failed is measured all the same: the evaluation records its failure.
    measured += [job for job in jobs if readings[job.genome_hash].status != COMPLETE]
    out = []
    for i, reason in reasons.items():
        result = readings[ok[i].genome_hash]
        result.status = PRUNED
        result.info.update({"pruned": reason, "tier": 0})
        result.metrics.update(predicted[i])
        out.append((ok[i], result))
    return measured, out
