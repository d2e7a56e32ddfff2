"""The per-layer latency table of tier 0 (petra.candidate.latency_table): layers timed alone on
ONNX Runtime, once per shape and scheme."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from petra.candidate.latency_table import LatencyTable, layer_inputs, own_weights


class Tower(nn.Module):
    """Two linears of the same shape, then a narrower one, and a recurrent layer."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.c = nn.Linear(width, 16)
        self.rnn = nn.LSTM(16, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.rnn(y.unsqueeze(1))[0].squeeze(1)


def test_each_weight_layer_is_recorded_once_with_its_input_in_call_order():
    model = Tower()
    found = layer_inputs(model, torch.randn(4, 256))
    assert [m for m, _ in found] == [model.a, model.b, model.c, model.rnn]
    assert [tuple(x[0].shape) for _, x in found] == [(4, 256), (4, 256), (4, 256), (4, 1, 16)]


def test_layers_of_one_shape_are_timed_once_and_every_layer_kind_alone():
    table = LatencyTable()
    model = Tower()
    estimate = table.estimate(model, torch.randn(4, 256), "none")
    assert math.isfinite(estimate) and estimate > 0
    assert len(table.times) == 3  # a and b share a shape; c; the LSTM
    assert all(math.isfinite(t) and t > 0 for t in table.times.values())
    table.estimate(model, torch.randn(4, 256), "none")
    assert len(table.times) == 3  # nothing timed again
    table.estimate(model, torch.randn(4, 256), "int8_dynamic")
    assert len(table.times) == 6  # another scheme, other times


def test_a_layer_that_cannot_stand_alone_makes_the_estimate_nan():
    class Unexportable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.jit.is_tracing() or torch.compiler.is_compiling():
                raise RuntimeError("this layer has no export")
            return x @ self.weight

    table = LatencyTable()
    model = nn.Sequential(nn.Linear(4, 4), Unexportable())
    assert math.isnan(table.estimate(model, torch.ones(2, 4), "none"))
    assert sum(math.isnan(t) for t in table.times.values()) == 1  # the linear has its time


def test_a_much_narrower_model_is_estimated_much_faster():
    table = LatencyTable()
    x = torch.randn(64, 512)
    wide = table.estimate(nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512)), x, "none")
    narrow = table.estimate(nn.Sequential(nn.Linear(512, 128), nn.Linear(128, 512)), x, "none")
    assert narrow < 0.6 * wide  # an eighth of the MACs


def test_the_screen_reads_a_latency_estimate_for_pruned_candidates(evaluator, monkeypatch):
    """The screen divides the table's sum for the pruned model by the dense one's. Each layer's
    time is its weights' size here, not a timing: the tiny task's layers run in microseconds,
    where halving channels is within the noise of a loaded machine (a CI run read 1.09)."""
    from tests.test_screen import every_conv

    sizes = []

    def by_size(_table, module, _inputs, _scheme) -> float:
        sizes.append(sum(p.numel() for p in own_weights(module)))
        return sizes[-1] * 1e-9

    monkeypatch.setattr(LatencyTable, "_time", by_size)
    dense = evaluator.screen({}).metrics["tier0_latency_ratio"]
    assert dense == pytest.approx(1.0)
    sizes.clear()
    pruned = evaluator.screen(every_conv("l2_channel", 0.5)).metrics["tier0_latency_ratio"]
    assert sizes, "the pruned convs have shapes of their own, timed anew"
    assert 0 < pruned < 0.9


def test_a_burst_of_load_over_some_blocks_does_not_count():
    import time

    from petra.candidate.latency_table import MIN_RUNS, WARMUP, fastest_block

    calls = []

    def run() -> None:  # slow for the warm-up and the first three blocks, then fast
        calls.append(None)
        time.sleep(0.004 if len(calls) <= WARMUP + 3 * MIN_RUNS else 0.0002)

    seconds = fastest_block(run)
    assert seconds < 0.002  # a median over every call would read the burst's 4 ms


class _Screener:
    """A Ray actor with a latency table of its own, shared through a directory."""

    def __init__(self, directory) -> None:
        self.table = LatencyTable(directory=directory)

    def estimate(self, width: int) -> tuple[float, int, int]:
        model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 64))
        estimate = self.table.estimate(model, torch.randn(8, 64), "none")
        return estimate, self.table.timed, self.table.shared


@pytest.mark.integration
def test_workers_time_each_shape_once_through_the_shared_directory(local_ray) -> None:
    import time

    from petra.compress.layer_cache import Directory

    ray = local_ray
    directory = ray.remote(num_cpus=0)(Directory).remote(0)  # no orders: times only
    screener = ray.remote(num_cpus=1)(_Screener)
    a, b = screener.remote(directory), screener.remote(directory)
    first, timed_a, shared_a = ray.get(a.estimate.remote(32))
    assert (timed_a, shared_a) == (2, 0) and first > 0
    deadline = time.monotonic() + 30
    while ray.get(directory.time_count.remote()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # A's registration is on its way
    again, timed_b, shared_b = ray.get(b.estimate.remote(32))
    assert (timed_b, shared_b) == (0, 2) and again == first  # A's times, none timed again
    _, timed_b, shared_b = ray.get(b.estimate.remote(16))  # two new shapes: timed by B
    assert (timed_b, shared_b) == (2, 2)


def test_a_screen_reports_what_timing_new_shapes_took_of_it(evaluator):
    from tests.test_screen import every_conv

    genome = every_conv("l2_channel", 0.375)
    first = evaluator.screen(genome).metrics
    assert 0 < first["tier0_table_s"] <= first["tier0_time_s"]
    again = evaluator.screen(genome).metrics  # every shape known: nothing timed
    assert again["tier0_table_s"] == 0.0 and again["tier0_time_s"] > 0
