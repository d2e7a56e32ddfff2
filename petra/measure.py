"""Measurements on the deployable artifact: accuracy, latency against the baseline, MACs.

Latency is a ratio to the dense baseline on the same runtime, measured in the same process and
interleaved: rounds alternate baseline and candidate blocks (the order flips every round), each
block's per-run median is taken, and the ratio is the median over rounds of the per-round ratios.
CPU speed on shared VMs drifts in phases of seconds; a per-round ratio cancels the drift that
both sides of the round see.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    """Interleaved latency of a candidate against the baseline, for one input batch."""

    ratio: float  # median over rounds of candidate / baseline
    ratio_iqr: float  # interquartile range of the per-round ratios
    candidate_ms: float  # median per-run time of the candidate
    baseline_ms: float  # median per-run time of the baseline
    rounds: int


def session_accuracy(
    session: Any, batches: Iterable[tuple[Any, Any]], metric: Callable[[Any, Any], float]
) -> float:
    """Batch-size-weighted mean ``metric`` of an ONNX Runtime session over ``batches``."""
    name = session.get_inputs()[0].name
    total, count = 0.0, 0
    for inputs, targets in batches:
        x = inputs.numpy() if hasattr(inputs, "numpy") else np.asarray(inputs)
        outputs = session.run(None, {name: x})[0]
        if not np.all(np.isfinite(outputs)):
            raise FloatingPointError("the artifact produced non-finite outputs")
        total += metric(outputs, targets) * len(targets)
        count += len(targets)
    return total / max(count, 1)


def _runner(session: Any, x: np.ndarray) -> Callable[[], Any]:
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def interleaved_latency(
    candidate: Any,
    baseline: Any,
    x: np.ndarray,
    *,
    rounds: int = 15,
    block_s: float = 0.03,
    warmup: int = 3,
) -> Latency:
    """Time ``candidate`` against ``baseline`` (ONNX Runtime sessions) on the batch ``x``.

    Args:
        candidate, baseline: sessions with the same input.
        x: the input batch.
        rounds: number of interleaved rounds.
        block_s: target duration of one block; the runs per block are sized from the baseline.
        warmup: untimed runs of each session first.
    """
    run_c, run_b = _runner(candidate, x), _runner(baseline, x)
    for _ in range(warmup):
        run_b()
        run_c()
    start = time.perf_counter()
    run_b()
    one = max(time.perf_counter() - start, 1e-6)
    per_block = int(min(max(block_s / one, 3), 200))
    ratios, cand_ms, base_ms = [], [], []
    for r in range(rounds):
        order = ((run_b, base_ms), (run_c, cand_ms))
        if r % 2:
            order = order[::-1]
        block = {}
        for run, sink in order:
            times = []
            for _ in range(per_block):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            block[id(sink)] = float(np.median(times))
            sink.append(block[id(sink)] * 1e3)
        ratios.append(block[id(cand_ms)] / block[id(base_ms)])
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return Latency(
        ratio=float(med), ratio_iqr=float(q3 - q1), candidate_ms=float(np.median(cand_ms)),
        baseline_ms=float(np.median(base_ms)), rounds=rounds,
    )


def macs_and_params(model: Any, example_input: Any) -> tuple[int, int, int]:
    """Per-sample MACs of the torch model, its parameter count, and its non-zero parameters."""
    import torch
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_input[:1])
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return int(macs), int(params), nonzero


def median_latency_ms(session: Any, x: np.ndarray, *, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time of one run of ``session`` on ``x``, in milliseconds."""
    run = _runner(session, x)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)
