"""Measurements on the deployable artifact: accuracy, latency against the baseline, MACs.

Latency is a ratio to the dense baseline on the same runtime, measured in the same process and
interleaved: rounds alternate baseline and candidate blocks (the order flips every round), each
block's per-run median is taken, and the ratio is the median over rounds of the per-round ratios.
CPU speed on shared VMs drifts in phases of seconds; a per-round ratio cancels the drift that
both sides of the round see.
"""

from __future__ import annotations

import contextlib
import io
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


def session_feed(session: Any, inputs: Any) -> dict[str, np.ndarray]:
    """The feed of ``session`` for a batch's inputs: a tuple of tensors in the session's input
    order (see :mod:`petra.tasks.contract`), a single tensor or array, or a ready feed."""
    if isinstance(inputs, dict):
        return inputs
    from petra.tasks.contract import feed

    values = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    return feed(values, [i.name for i in session.get_inputs()])


def session_accuracy(
    session: Any, batches: Iterable[tuple[Any, Any]], metric: Callable[[Any, Any], float]
) -> float:
    """Batch-size-weighted mean ``metric`` of an ONNX Runtime session over ``batches``.

    The metric receives torch tensors, as it does in the fine-tune: the session's output is
    converted with ``torch.from_numpy``.
    """
    return session_metric(session, batches, metric)[0]


def session_metric(
    session: Any, batches: Iterable[tuple[Any, Any]], metric: Callable[[Any, Any], float]
) -> tuple[float, int]:
    """:func:`session_accuracy`, and the number of examples it was averaged over."""
    from petra.tasks.contract import batch_size, to_torch

    total, count = 0.0, 0
    for inputs, targets in batches:
        outputs = session.run(None, session_feed(session, inputs))[0]
        if not np.all(np.isfinite(outputs)):
            raise FloatingPointError("the artifact produced non-finite outputs")
        n = batch_size(targets)
        total += float(metric(to_torch(outputs), targets)) * n
        count += n
    return total / max(count, 1), count


def _runner(session: Any, x: Any) -> Callable[[], Any]:
    feed = session_feed(session, x)
    return lambda: session.run(None, feed)


class InterleavedTimer:
    """Interleaved rounds of a candidate against the baseline, run in stages.

    :meth:`run` adds rounds; :meth:`result` summarises every round so far. Timing 4 rounds,
    deciding something, then timing 11 more gives exactly the measurement of 15 rounds, which
    is how a multi-fidelity decision reads the first rounds of the final measurement.

    Args:
        candidate, baseline: ONNX Runtime sessions with the same inputs.
        x: the input batch (see :func:`session_feed`).
        block_s: target duration of one block; the runs per block are sized from the baseline.
        warmup: untimed runs of each session first.
    """

    def __init__(
        self, candidate: Any, baseline: Any, x: Any, *, block_s: float = 0.03,
        warmup: int = 3,
    ) -> None:
        self._run_c, self._run_b = _runner(candidate, x), _runner(baseline, x)
        for _ in range(warmup):
            self._run_b()
            self._run_c()
        start = time.perf_counter()
        self._run_b()
        one = max(time.perf_counter() - start, 1e-6)
        self._per_block = int(min(max(block_s / one, 3), 200))
        self._ratios: list[float] = []
        self._cand_ms: list[float] = []
        self._base_ms: list[float] = []

    @property
    def rounds(self) -> int:
        return len(self._ratios)

    def run(self, rounds: int) -> InterleavedTimer:
        """Time ``rounds`` more rounds; the order of the two blocks flips every round."""
        for _ in range(rounds):
            order = ((self._run_b, self._base_ms), (self._run_c, self._cand_ms))
            if len(self._ratios) % 2:
                order = order[::-1]
            block = {}
            for run, sink in order:
                times = []
                for _ in range(self._per_block):
                    t0 = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t0)
                block[id(sink)] = float(np.median(times))
                sink.append(block[id(sink)] * 1e3)
            self._ratios.append(block[id(self._cand_ms)] / block[id(self._base_ms)])
        return self

    def result(self) -> Latency:
        """The median per-round ratio, its IQR, and the median block times, so far."""
        if not self._ratios:
            raise ValueError("no rounds timed yet")
        q1, med, q3 = np.percentile(self._ratios, [25, 50, 75])
        return Latency(
            ratio=float(med), ratio_iqr=float(q3 - q1),
            candidate_ms=float(np.median(self._cand_ms)),
            baseline_ms=float(np.median(self._base_ms)), rounds=len(self._ratios),
        )


def interleaved_latency(
    candidate: Any,
    baseline: Any,
    x: Any,
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
    timer = InterleavedTimer(candidate, baseline, x, block_s=block_s, warmup=warmup)
    return timer.run(rounds).result()


def macs_and_params(model: Any, example_input: Any) -> tuple[int, int, int]:
    """Per-sample MACs of the torch model, its parameter count, and its non-zero parameters."""
    import torch
    import torch_pruning as tp
    from torch_pruning.utils import op_counter

    one = tuple(x[:1] for x in example_input) if isinstance(example_input, tuple | list) \
        else example_input[:1]
    known = op_counter.MODULES_MAPPING  # by exact type: Falcon's FalconLinear counted no MACs
    for kind in {type(m) for m in model.modules()} - set(known):
        base = next((b for b in kind.__mro__[1:] if b in known), None)
        if base is not None and kind.forward is not base.forward:
            op_counter.CUSTOM_MODULES_MAPPING[kind] = known[base]
    # it prints a warning for each module instance used twice (a GhostNet's shared ReLU)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        macs, params = tp.utils.count_ops_and_params(model, one)
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return int(macs), int(params), nonzero


def median_latency_ms(session: Any, x: Any, *, runs: int = 50, warmup: int = 5) -> float:
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
