"""Tier 0's latency: a per-layer table timed on the deployment runtime, once per shape.

A candidate's latency is estimated as the sum of its weight layers' times, each layer timed
alone: exported to ONNX with the input it receives in the candidate (recorded by a forward pass
on the task's example input), quantized by the candidate's scheme, and run in ONNX Runtime with
the search's threads and providers. The times are cached by the layer's exact shape (its
``repr``, its parameters' and inputs' shapes) and scheme, so each shape is timed once per worker
however many candidates share it; pruning in steps of ``round_to`` keeps the shapes few. Under
Ray the workers share their times through the executor's
:class:`~petra.compress.layer_cache.Directory` actor: a worker asks it for the shapes it has not
timed (one call per candidate) and registers the ones it times, so a shape is timed once per
search, not once per worker. On digits_cnn a shape's first timing (export, quantization,
session, timed runs) takes about 34 ms, most of a cold screen.

The ratio of that sum to the dense model's (in float32) is ``tier0_latency_ratio``. What the
table leaves out (activations, normalizations, the graph's own overhead, and fusions across
layers) :class:`petra.engine.racing.Calibration` learns from every measured candidate.
A layer that cannot be exported alone makes the estimate NaN, and racing falls back to its
MACs model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from petra.candidate import artifact
from petra.registry import QUANTIZATION
from petra.tasks.contract import args

#: Each timing: warm-up runs, then ``REPEATS`` blocks, each of runs until both its count and its
#: time are reached; the layer's time is the fastest block's median, so a burst of load from
#: elsewhere on the machine that covers some blocks does not count.
WARMUP, REPEATS, MIN_RUNS, MAX_RUNS, MIN_SECONDS = 3, 5, 5, 60, 0.006


class _Alone(nn.Module):
    """One layer as a model: its first output only (an LSTM's sequence, not its state)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *inputs: Any) -> Any:
        out = self.layer(*inputs)
        return out[0] if isinstance(out, tuple) else out


def own_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weight matrices a module holds itself: parameters of 2 or more dimensions whose name
    holds ``weight`` (``weight``, ``in_proj_weight``, ``weight_ih_l0``)."""
    return [p for n, p in module.named_parameters(recurse=False) if "weight" in n and p.dim() >= 2]


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that hold a weight matrix of their own (convs, linears, attention, LSTMs,
    embeddings)."""
    return [m for m in model.modules() if own_weights(m)]


def layer_inputs(model: nn.Module, example: Any) -> list[tuple[nn.Module, tuple[Any, ...]]]:
    """Each weight layer of ``model`` with the tensors it receives on ``example`` (its first
    call), in call order."""
    seen: dict[int, tuple[nn.Module, tuple[Any, ...]]] = {}

    def hook(module: nn.Module, inputs: Any, _output: Any) -> None:
        seen.setdefault(id(module), (module, tuple(
            x.detach() for x in inputs if isinstance(x, torch.Tensor))))

    hooks = [m.register_forward_hook(hook) for m in weight_layers(model)]
    try:
        model.eval()
        with torch.no_grad():
            model(*args(example))
    finally:
        for h in hooks:
            h.remove()
    return list(seen.values())


class LatencyTable:
    """Layer times in seconds, keyed by shape and scheme, for one worker."""

    def __init__(self, *, threads: int = 1,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 directory: Any = None) -> None:
        self.threads, self.providers = threads, list(providers)
        self.times: dict[tuple[Any, ...], float] = {}
        self.directory = directory  # a Directory actor handle shared with other workers, or None
        self.timed = self.shared = 0  # shapes timed here, and shapes another worker timed
        self.seconds = 0.0  # spent timing shapes here: the table's one-off cost

    def estimate(self, model: nn.Module, example: Any, scheme: str) -> float:
        """The summed layer times of ``model`` (on the CPU) under ``scheme``; NaN when a layer
        cannot be timed alone."""
        layers = [(_key(m, x, scheme), m, x) for m, x in layer_inputs(model, example)]
        self._fetch({key for key, _, _ in layers if key not in self.times})
        new = {}
        for key, module, inputs in layers:
            if key not in self.times:
                self.times[key] = new[key] = self._safe_time(module, inputs, scheme)
        self._publish(new)
        return float(sum(self.times[key] for key, _, _ in layers))

    def _safe_time(self, module: nn.Module, inputs: tuple[Any, ...], scheme: str) -> float:
        self.timed += 1
        start = time.perf_counter()
        try:
            return self._time(module, inputs, scheme)
        except Exception:  # noqa: BLE001 - a layer that cannot stand alone has no time
            return math.nan
        finally:
            self.seconds += time.perf_counter() - start

    def _fetch(self, keys: set[tuple[Any, ...]]) -> None:
        """The times of ``keys`` another worker registered, taken into this table."""
        if self.directory is None or not keys:
            return
        import ray

        try:
            found = ray.get(self.directory.times.remote(list(keys)))
        except Exception:  # noqa: BLE001 - sharing is an optimization: time them here
            return
        self.times.update(found)
        self.shared += len(found)

    def _publish(self, times: dict[tuple[Any, ...], float]) -> None:
        if self.directory is None or not times:
            return
        try:
            self.directory.add_times.remote(times)
        except Exception:  # noqa: BLE001 - sharing is an optimization, never a failure
            return

    def _time(self, module: nn.Module, inputs: tuple[Any, ...], scheme: str) -> float:
        from petra.compress.quantize import QuantContext

        proto = artifact.export_onnx(_Alone(copy.deepcopy(module)), inputs)
        names = [i.name for i in proto.graph.input]
        feed = {n: x.cpu().numpy() for n, x in zip(names, inputs, strict=True)}
        proto = QUANTIZATION.get(scheme).fn(proto, QuantContext(calibration=[feed]))
        session = artifact.load(artifact.pack(proto), threads=self.threads,
                                providers=self.providers)
        return fastest_block(lambda: session.run(None, feed))


def _key(module: nn.Module, inputs: tuple[Any, ...], scheme: str) -> tuple[Any, ...]:
    """What a layer's time depends on: its class, its ``repr``, its own parameters' shapes, its
    inputs' shapes and the scheme."""
    own = tuple(tuple(p.shape) for p in module.parameters(recurse=False))
    return (type(module).__qualname__, repr(module), own,
            tuple(tuple(x.shape) for x in inputs), scheme)


def fastest_block(run: Callable[[], Any]) -> float:
    """Seconds per call of ``run``: the median of the fastest of ``REPEATS`` blocks of calls,
    after ``WARMUP`` calls."""
    for _ in range(WARMUP):
        run()
    medians = []
    for _ in range(REPEATS):
        times: list[float] = []
        deadline = time.perf_counter() + MIN_SECONDS
        while len(times) < MAX_RUNS and (len(times) < MIN_RUNS or time.perf_counter() < deadline):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)))
    return min(medians)
