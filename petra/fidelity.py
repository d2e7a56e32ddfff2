"""Multi-fidelity: stop a candidate after a short fine-tune when it cannot reach the front.

A candidate whose fine-tune is longer than the rung (``search.multi_fidelity.rung_epochs``) is
measured twice on the way:

1. **The probe**, before the fine-tune. Pruning has fixed the model's structure, so its artifact
   is exported and quantized, its bytes read and its latency timed briefly against the baseline.
   The fine-tune changes weight values only, never the graph.
2. **The rung**, after ``rung_epochs`` epochs: the validation accuracy of the model in torch.

An optimistic reading of the two — the accuracy plus the *headroom* that the rest of the
fine-tune may still add, the latency less its measured spread — is compared with the front of
the previous generations and with the constraints. A candidate that a front member dominates even
so, or that cannot meet a constraint, stops there with status ``pruned``; its rung measurement is
what its run logs. Survivors finish the fine-tune and are measured in full, like every candidate.

The headroom is learned from the search's own survivors: the largest gain from the rung accuracy
to the final validation accuracy seen in earlier generations, plus a margin. Until enough
survivors have been seen, no candidate is stopped for the front; a constraint on bytes or latency,
which the fine-tune cannot change, stops it at once.

Only earlier generations feed a rung, so the same seed makes the same decisions whatever order
the candidates of a generation finish in, and a resumed search decides as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The metrics the fine-tune can change; every other objective is fixed by the probe.
TRAINABLE = frozenset({"val_accuracy"})
#: Added to the largest gain seen, so a candidate just like the best survivor is not stopped.
HEADROOM_MARGIN = 0.01
#: Survivors needed before the headroom is trusted.
MIN_OBSERVATIONS = 3
#: Rounds and block length of the probe's latency measurement (the final one uses more).
PROBE_ROUNDS = 5
PROBE_BLOCK_S = 0.02


@dataclass(frozen=True)
class Rung:
    """When and against what a candidate's fine-tune may be stopped.

    Attributes:
        epochs: the short fine-tune after which the rung is read.
        objectives: ``(metric, direction)`` pairs.
        front: the metrics of the reference front's members.
        baseline: the dense baseline's metrics (for the accuracy constraint).
        constraints: ``max_accuracy_drop``, ``max_bytes``, ``max_latency_ratio`` (None: unset).
        headroom: the accuracy the rest of the fine-tune may still add; None while unknown,
            which disables every stop that depends on accuracy.
    """

    epochs: int
    objectives: tuple[tuple[str, str], ...]
    front: tuple[Mapping[str, float], ...] = ()
    baseline: Mapping[str, float] = field(default_factory=dict)
    constraints: Mapping[str, float | None] = field(default_factory=dict)
    headroom: float | None = None

    def applies(self, epochs: int) -> bool:
        """Whether a fine-tune of ``epochs`` epochs is long enough to have a rung."""
        return epochs > self.epochs

    def optimistic(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The best that ``metrics`` of a rung could still become."""
        out = dict(metrics)
        headroom = math.inf if self.headroom is None else self.headroom
        if "val_accuracy" in out:
            out["val_accuracy"] = out["val_accuracy"] + headroom
        spread = float(metrics.get("latency_ratio_iqr", 0.0))
        if "latency_ratio" in out and out["latency_ratio"] > 0:
            scale = max(0.0, 1.0 - spread / out["latency_ratio"])
            out["latency_ratio"] *= scale
            if "latency_ms" in out:
                out["latency_ms"] *= scale
        return out

    def stop_reason(self, metrics: Mapping[str, float], *, probe_only: bool = False) -> str | None:
        """Why a candidate with these rung (or probe) metrics should stop; None to go on.

        Args:
            metrics: the probe's bytes and latency, and, unless ``probe_only``, the rung's
                validation accuracy.
            probe_only: judge only what the fine-tune cannot change (bytes and latency
                constraints), before any fine-tune.
        """
        from petra.pareto import to_minimization, violation

        best = self.optimistic(metrics)
        constraints = dict(self.constraints)
        if probe_only or self.headroom is None:
            constraints.pop("max_accuracy_drop", None)
        if violation(best, self.baseline, constraints) > 0:
            limits = ", ".join(f"{k}={v:g}" for k, v in constraints.items() if v is not None)
            return f"cannot meet the constraints ({limits})"
        if probe_only or self.headroom is None or not self.front:
            return None
        if any(m not in best for m, _ in self.objectives):
            return None
        point = to_minimization([best], self.objectives)[0]
        front = to_minimization(list(self.front), self.objectives)
        dominated = ((front <= point).all(axis=1) & (front < point).any(axis=1)).any()
        if dominated:
            return (f"dominated by the front even with +{self.headroom:.3f} accuracy "
                    f"after {self.epochs} epoch(s)")
        return None


def learn_headroom(
    records: Iterable[Mapping[str, Any]], *, margin: float = HEADROOM_MARGIN,
    min_observations: int = MIN_OBSERVATIONS,
) -> float | None:
    """The largest rung-to-final accuracy gain among complete ``records``, plus ``margin``.

    A record counts when its metrics hold both ``rung_val_accuracy`` and ``val_accuracy``.
    Returns None with fewer than ``min_observations`` of them.
    """
    gains = [
        float(r["metrics"]["val_accuracy"]) - float(r["metrics"]["rung_val_accuracy"])
        for r in records
        if r.get("status") == "complete" and "rung_val_accuracy" in (r.get("metrics") or {})
        and "val_accuracy" in r["metrics"]
    ]
    gains = [g for g in gains if math.isfinite(g)]
    if len(gains) < min_observations:
        return None
    return max(0.0, max(gains)) + margin


def rung_for_generation(
    *, records: Sequence[Mapping[str, Any]], generation: int, epochs: int,
    objectives: Sequence[tuple[str, str]], baseline: Mapping[str, float],
    constraints: Mapping[str, float | None] | None, headroom: float | None = None,
) -> Rung:
    """The rung for candidates of ``generation``, from the records of earlier generations only.

    Args:
        records: every record so far (those of ``generation`` and later are ignored).
        epochs: the rung's short fine-tune.
        headroom: a fixed headroom; None learns it with :func:`learn_headroom`.
    """
    from petra import pareto

    earlier = [r for r in records if int(r.get("generation", 0)) < generation]
    snap = pareto.snapshot(earlier, objectives, baseline, generation, constraints)
    return Rung(
        epochs=int(epochs),
        objectives=tuple((str(m), str(d)) for m, d in objectives),
        front=tuple(dict(m["metrics"]) for m in snap.members),
        baseline=dict(baseline),
        constraints=dict(constraints or {}),
        headroom=learn_headroom(earlier) if headroom is None else float(headroom),
    )
