"""Multi-fidelity: stop a candidate as soon as it is clear it cannot reach the front.

A candidate is read at up to three points, each cheaper than what it saves:

1. **The probe**, before the fine-tune, for a fine-tune longer than the rung
   (``search.multi_fidelity.rung_epochs``). Pruning has fixed the model's structure, so its
   artifact is exported and quantized, its bytes read and its latency timed in a few rounds. The
   fine-tune changes weight values only, never the graph. A bytes or latency constraint that the
   candidate cannot meet stops it here, before any fine-tune.
2. **The rung**, after ``rung_epochs`` epochs: the validation accuracy of the model in torch,
   lifted by the accuracy that the rest of the fine-tune may still add (see below).
3. **The measurement**, after the fine-tune: the final artifact's accuracy and bytes are exact,
   and its latency has had the first :data:`FIRST_ROUNDS` of its interleaved rounds. Only a
   candidate that goes on gets the remaining rounds, and its latency is the median over all of
   them: the same measurement as without multi-fidelity.

At each point an optimistic reading — accuracy lifted as above, latency less its measured spread
(at least :data:`LATENCY_SLACK`) — is compared with the front of the previous generations and
with the constraints. A candidate that a front member dominates even so, or that cannot meet a
constraint, stops with status ``pruned``; its run logs what was measured up to there.

**What the rest of the fine-tune may add** is learned from the search's own survivors, each of
which records its rung accuracy and its final accuracy. The optimistic final accuracy of a rung
accuracy ``a`` is the best final accuracy reached by survivors whose rung was no better than
``a + RUNG_TOLERANCE``, plus :data:`HEADROOM_MARGIN`. With fewer than :data:`MIN_OBSERVATIONS`
such survivors it is ``a`` plus the largest gain any survivor made, plus the margin; with fewer
than that many survivors in all, no candidate is stopped for its accuracy. A fixed
``search.multi_fidelity.headroom`` replaces all this with ``a + headroom``.

Only earlier generations feed a rung, so the same seed makes the same decisions whatever order
the candidates of a generation finish in, and a resumed search decides as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from petra.engine import pareto
from petra.engine.pareto import to_minimization, violation
from petra.errors import COMPLETE

#: Added to the best final accuracy in evidence, so a candidate like the best is not stopped.
HEADROOM_MARGIN = 0.01
#: Rung accuracies within this of a candidate's count as "no better" than it.
RUNG_TOLERANCE = 0.02
#: Survivors needed before accuracy-based stops (and per rung-accuracy neighbourhood).
MIN_OBSERVATIONS = 3
#: The optimistic latency is at least this fraction below the measured ratio.
LATENCY_SLACK = 0.05
#: Rounds and block length of the probe's latency.
PROBE_ROUNDS = 3
PROBE_BLOCK_S = 0.01
#: Rounds of the final latency measurement read before the measurement stop; of all of them.
FIRST_ROUNDS = 4
ALL_ROUNDS = 15

STAGES = ("probe", "rung", "measured")


@dataclass(frozen=True)
class Rung:
    """When and against what a candidate may be stopped.

    Attributes:
        epochs: the short fine-tune after which the rung is read.
        objectives: ``(metric, direction)`` pairs.
        front: the metrics of the reference front's members.
        baseline: the dense baseline's metrics (for the accuracy constraint).
        constraints: ``max_accuracy_drop``, ``max_bytes``, ``max_latency_ratio`` (None: unset).
        evidence: ``(rung accuracy, final accuracy)`` of earlier survivors.
        headroom: a fixed accuracy gain after the rung; None learns it from ``evidence``.
    """

    epochs: int
    objectives: tuple[tuple[str, str], ...]
    front: tuple[Mapping[str, float], ...] = ()
    baseline: Mapping[str, float] = field(default_factory=dict)
    constraints: Mapping[str, float | None] = field(default_factory=dict)
    evidence: tuple[tuple[float, float], ...] = ()
    headroom: float | None = None

    def applies(self, epochs: int) -> bool:
        """Whether a fine-tune of ``epochs`` epochs is long enough to have a probe and a rung."""
        return epochs > self.epochs

    def final_accuracy_bound(self, rung_accuracy: float) -> float | None:
        """The best final accuracy a candidate with this rung accuracy may still reach; None
        while the evidence is too thin to say."""
        if self.headroom is not None:
            return rung_accuracy + self.headroom
        if len(self.evidence) < MIN_OBSERVATIONS:
            return None
        support = [final for rung, final in self.evidence
                   if rung <= rung_accuracy + RUNG_TOLERANCE]
        if len(support) >= MIN_OBSERVATIONS:
            return max(max(support), rung_accuracy) + HEADROOM_MARGIN
        gain = max(final - rung for rung, final in self.evidence)
        return rung_accuracy + max(gain, 0.0) + HEADROOM_MARGIN

    def optimistic(self, metrics: Mapping[str, float], stage: str) -> dict[str, float] | None:
        """The best that ``metrics`` read at ``stage`` could still become.

        Returns None at the rung while the accuracy cannot be bounded yet. At the probe there
        is no accuracy: it is left out.
        """
        out = dict(metrics)
        if stage == "rung":
            bound = self.final_accuracy_bound(float(metrics["val_accuracy"]))
            if bound is None:
                return None
            out["val_accuracy"] = bound
        ratio = out.get("latency_ratio")
        if ratio is not None and ratio > 0:
            spread = float(metrics.get("latency_ratio_iqr", 0.0)) / ratio
            scale = 1.0 - min(1.0, max(LATENCY_SLACK, spread))
            out["latency_ratio"] = ratio * scale
            if "latency_ms" in out:
                out["latency_ms"] *= scale
        return out

    def stop_reason(self, metrics: Mapping[str, float], stage: str) -> str | None:
        """Why a candidate read at ``stage`` should stop; None to go on.

        Args:
            metrics: what is measured so far: the probe's bytes and latency, plus the rung's
                validation accuracy (``stage="rung"``), or the final accuracy and bytes with
                the first rounds of the final latency (``stage="measured"``).
            stage: one of ``probe``, ``rung``, ``measured``.
        """

        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}; got {stage!r}")
        best = self.optimistic(metrics, stage)
        constraints = {k: v for k, v in self.constraints.items() if v is not None}
        if best is None or stage == "probe":
            constraints.pop("max_accuracy_drop", None)  # no accuracy to judge yet
        if best is None:
            best = self.optimistic({k: v for k, v in metrics.items() if k != "val_accuracy"},
                                   "probe")
        if constraints and violation(best, self.baseline, constraints) > 0:
            limits = ", ".join(f"{k}={v:g}" for k, v in constraints.items())
            return f"{stage}: cannot meet the constraints ({limits})"
        if stage == "probe" or not self.front or "val_accuracy" not in best:
            return None
        if any(m not in best or not math.isfinite(best[m]) for m, _ in self.objectives):
            return None
        point = to_minimization([best], self.objectives)[0]
        front = to_minimization(list(self.front), self.objectives)
        if ((front <= point).all(axis=1) & (front < point).any(axis=1)).any():
            if stage == "rung":
                return (f"rung: dominated by the front even at val_accuracy "
                        f"{best['val_accuracy']:.4f} after {self.epochs} epoch(s)")
            return (f"measured: dominated by the front even at latency_ratio "
                    f"{best['latency_ratio']:.3f} after {FIRST_ROUNDS} rounds")
        return None


def rung_evidence(records: Sequence[Mapping[str, Any]]) -> tuple[tuple[float, float], ...]:
    """``(rung accuracy, final accuracy)`` of every record with a rung that finished its
    fine-tune: complete ones, and those stopped at the measurement."""
    pairs = []
    for r in records:
        m = r.get("metrics") or {}
        genome = r.get("genome") or {}
        finished = (r.get("status") == COMPLETE or (
            r.get("status") == "pruned"
            and m.get("fidelity_epochs") == float(genome.get("finetune.epochs", -1))))
        if finished and "rung_val_accuracy" in m and "val_accuracy" in m:
            pair = (float(m["rung_val_accuracy"]), float(m["val_accuracy"]))
            if all(math.isfinite(v) for v in pair):
                pairs.append(pair)
    return tuple(pairs)


def rung_for_generation(
    *, records: Sequence[Mapping[str, Any]], generation: int, epochs: int,
    objectives: Sequence[tuple[str, str]], baseline: Mapping[str, float],
    constraints: Mapping[str, float | None] | None, headroom: float | None = None,
) -> Rung:
    """The rung for candidates of ``generation``, from the records of earlier generations only.

    Args:
        records: every record so far (those of ``generation`` and later are ignored).
        epochs: the rung's short fine-tune.
        headroom: a fixed accuracy gain after the rung; None learns it.
    """

    earlier = [r for r in records if int(r.get("generation", 0)) < generation]
    snap = pareto.snapshot(earlier, objectives, baseline, generation, constraints)
    return Rung(
        epochs=int(epochs),
        objectives=tuple((str(m), str(d)) for m, d in objectives),
        front=tuple(dict(m["metrics"]) for m in snap.members),
        baseline=dict(baseline),
        constraints=dict(constraints or {}),
        evidence=rung_evidence(earlier),
        headroom=None if headroom is None else float(headroom),
    )
