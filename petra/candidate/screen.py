"""Tier 0: a candidate read in torch in well under a second, with no fine-tune and no export of
the whole model.

A screen compresses the dense model as the candidate's recipe says (pruning, skipped blocks,
low-rank factors, masks), re-estimates BatchNorm statistics on a few training batches, rounds
the weights to the scheme's storage format, and reads these numbers:

- **divergence** from the dense model on a fixed calibration batch (lower is better): the KL
  divergence of the output distributions over the class dimension for a classifier (integer
  targets, one dimension fewer than the outputs: :func:`~petra.compress.regularize.class_dim`;
  a sequence's or a segmentation's mean over its positions), ``1 - cosine`` for any other
  float output (embeddings), else the increase of the task loss (a regression, whose float
  targets have the outputs' size);
- **size ratio**: the candidate's artifact bytes estimated from the packing rules of
  :mod:`petra.candidate.artifact` (a tensor is stored sparse when its bitmask plus non-zero
  values are smaller; int8 weights take a byte and a per-channel scale, int4 half a byte, fp16
  two; BatchNorms fold into the layer before them; each formatted tensor adds its
  :data:`LAYER_OVERHEAD`), over the dense model's estimate. The zip's deflate is left out: it
  takes 5-7% off trained fp32 weights, on both sides of the ratio;
- **MACs ratio**: the per-sample MACs of the compressed model over the dense model's, and the
  **layers ratio**, its weight layers over the dense model's (skipped blocks take theirs away);
- **latency ratio**: the summed times of its weight layers, each timed alone on the deployment
  runtime with the candidate's scheme and cached by shape, over the dense model's
  (:mod:`petra.candidate.latency_table`).

Only the scheme's *weight* rounding is simulated in torch (registry metadata ``weights``): the activation
grid of static int8 and the runtime's kernels are left to the measured tiers. Nothing a screen
returns ever stands on a front: it ranks candidates before the measured evaluation, and
:class:`petra.engine.racing.Calibration` maps it to the measured objectives as they arrive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petra.candidate.device import OnDevice, to_device
from petra.candidate.latency_table import LatencyTable, own_weights, weight_layers
from petra.candidate.measure import macs_and_params
from petra.compress.gates import recalibrate_batchnorm
from petra.compress.regularize import class_dim
from petra.registry import QUANTIZATION
from petra.tasks.contract import args

if TYPE_CHECKING:
    from petra.tasks import Task

#: Bytes of one stored weight element, per registry ``weights`` format.
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
#: Bytes each formatted weight tensor adds beside its values, measured on digits_cnn at widths
#: 8 and 32: int8's QuantizeLinear/DequantizeLinear nodes with their scale and zero-point
#: initializers, int4's scale vector and manifest entry, fp16's Cast node.
LAYER_OVERHEAD = {"fp32": 0.0, "fp16": 150.0, "int8": 450.0, "int4": 400.0}
#: Symmetric integer grids (levels each side of zero) of the integer formats.
QMAX = {"int8": 127, "int4": 7}
#: Tensors below this size are stored dense (``artifact._MIN_SPARSE_SIZE``).
MIN_SPARSE_SIZE = 64
#: A scheme's ``applies_to`` names layer classes; an attention's projections are MatMuls in the
#: exported graph, so a scheme that applies to ``Linear`` takes them too.
_LINEAR_LIKE = ("MultiheadAttention",)
#: Exported in eval mode, a BatchNorm is folded into the conv or linear before it.
_BATCH_NORMS = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Reading:
    """A tier-0 reading: lower divergence, size and MACs are better."""

    divergence: float
    size_ratio: float
    macs_ratio: float
    layers_ratio: float  # weight layers left: each is a node, and a node costs time of its own
    latency_ratio: float = math.nan  # the per-layer latency table's estimate
    table_s: float = 0.0  # what timing new layer shapes for the table took: once per shape

    def as_metrics(self) -> dict[str, float]:
        return {"tier0_divergence": self.divergence, "tier0_size_ratio": self.size_ratio,
                "tier0_macs_ratio": self.macs_ratio, "tier0_layers_ratio": self.layers_ratio,
                "tier0_latency_ratio": self.latency_ratio, "tier0_table_s": self.table_s}


def stored_bytes(model: nn.Module, weights: str = "fp32",
                 applies_to: Iterable[str] | None = None) -> float:
    """The bytes ``model``'s tensors take in an artifact whose scheme stores the weights of
    ``applies_to`` layer types (class names; None: convs and linears) in format ``weights``."""
    formatted = {id(w) for w in _stored_weights(model, applies_to)}
    total = LAYER_OVERHEAD[weights] * len(formatted)
    folded = {id(t) for m in model.modules() if isinstance(m, _BATCH_NORMS)
              for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    for tensor in {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values():
        if id(tensor) in folded or not tensor.is_floating_point():
            continue  # folded into the layer before it at export; counters are not exported
        fmt = weights if id(tensor) in formatted else "fp32"
        element = WEIGHT_BYTES[fmt]
        n = tensor.numel()
        dense = n * element
        if fmt in QMAX and tensor.dim() > 1:
            dense += tensor.shape[0] * 4.0  # a float32 scale per output channel
        nonzero = int(torch.count_nonzero(tensor))
        sparse = math.ceil(n / 8) + nonzero * element
        total += sparse if n >= MIN_SPARSE_SIZE and sparse < dense else dense
    return total


def _stored_weights(model: nn.Module, applies_to: Iterable[str] | None) -> list[torch.Tensor]:
    """The weight matrices (:func:`~petra.candidate.latency_table.own_weights`) of the layers a
    scheme applies to: those with a class (or base class) named in ``applies_to``; None: every
    layer (convs, linears, attention projections, recurrent layers and embedding tables)."""
    kinds = set(applies_to) if applies_to is not None else None
    if kinds is not None and "Linear" in kinds:
        kinds |= set(_LINEAR_LIKE)
    out = []
    for module in model.modules():
        if kinds is None or any(c.__name__ in kinds for c in type(module).__mro__):
            out += own_weights(module)
    return out


@torch.no_grad()
def round_weights(model: nn.Module, weights: str, applies_to: Iterable[str] | None = None) -> None:
    """Round, in place, the weights a scheme stores in format ``weights`` to that format:
    per-output-channel symmetric grids for the integer formats, half precision for fp16."""
    if weights == "fp32":
        return
    for weight in _stored_weights(model, applies_to):
        if weights == "fp16":
            weight.copy_(weight.half().float())
            continue
        qmax = QMAX[weights]
        flat = weight.reshape(weight.shape[0], -1)
        scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
        weight.copy_((torch.round(flat / scale).clamp(-qmax, qmax) * scale).reshape(weight.shape))


def divergence(task: Task, dense: torch.Tensor, outputs: torch.Tensor, targets: Any) -> float:
    """How far ``outputs`` are from the dense model's ``dense`` on the same batch (see the
    module docstring for the measure each kind of output gets)."""
    dense, outputs = dense.float(), outputs.float()
    if not torch.isfinite(outputs).all():
        return math.inf
    dim = class_dim(dense, targets)
    if dim is not None and dense.shape == outputs.shape:
        log_p, log_q = dense.log_softmax(dim), outputs.log_softmax(dim)
        return float((log_p.exp() * (log_p - log_q)).sum(dim).mean())
    regression = isinstance(targets, torch.Tensor) and targets.is_floating_point() and \
        targets.numel() == dense.numel()
    if not regression and dense.is_floating_point() and dense.shape == outputs.shape:
        flat_d, flat_o = dense.reshape(len(dense), -1), outputs.reshape(len(outputs), -1)
        return float(1 - torch.nn.functional.cosine_similarity(flat_d, flat_o, dim=1).mean())
    return float(task.loss(outputs, targets) - task.loss(dense, targets))


@dataclass
class Screen:
    """What a screen compares against, built once per worker: the dense model's outputs on the
    calibration batch, its estimated bytes per scheme, and its MACs."""

    task: Task
    batch: tuple[Any, Any]
    bn_batches: list[Any]
    dense_outputs: torch.Tensor
    dense_bytes: float
    dense_macs: int
    dense_layers: int
    table: LatencyTable | None = None
    dense_latency: float = math.nan

    @classmethod
    def build(cls, task: Task, *, bn_batches: int = 4, table: LatencyTable | None = None
              ) -> Screen:
        """Calibration data from the training split: never the validation or test data. With
        a ``table``, latency is estimated per layer (:mod:`petra.candidate.latency_table`)."""
        train = iter(task.train)
        batch = next(train)
        extra = [b for _, b in zip(range(bn_batches - 1), train, strict=False)]
        task.model.eval()
        with torch.no_grad():
            dense = task.model(*args(batch[0]))
        macs, _, _ = macs_and_params(task.model, task.example_input)
        dense_latency = table.estimate(task.model, task.example_input, "none") if table \
            else math.nan
        return cls(task, batch, [batch, *extra], dense, stored_bytes(task.model), max(macs, 1),
                   max(len(weight_layers(task.model)), 1), table, dense_latency)

    def read(self, model: nn.Module, scheme: str, *, pruned: bool = True,
             device: torch.device | None = None) -> Reading:
        """The tier-0 reading of ``model`` (compressed, not fine-tuned) under ``scheme``. A
        ``pruned`` model's BatchNorm statistics are re-estimated; its weights are rounded to
        the scheme's format. Both in place; the forward passes run on ``device`` (the CPU by
        default)."""
        meta: Mapping[str, Any] = QUANTIZATION.get(scheme).meta
        weights, applies_to = meta["weights"], meta["applies_to"]
        size = stored_bytes(model, weights, applies_to)
        macs, _, _ = macs_and_params(model, self.task.example_input)
        latency, table_s = math.nan, 0.0
        if self.table is not None:
            filled = self.table.seconds
            latency = self.table.estimate(model, self.task.example_input, scheme) / \
                self.dense_latency
            table_s = self.table.seconds - filled
        device = device or torch.device("cpu")
        model.to(device)
        if pruned:
            recalibrate_batchnorm(model, OnDevice(self.bn_batches, device))
        round_weights(model, weights, applies_to)
        model.eval()
        with torch.no_grad():
            outputs = model(*args(to_device(self.batch[0], device))).cpu()
        return Reading(divergence(self.task, self.dense_outputs, outputs, self.batch[1]),
                       size / self.dense_bytes, macs / self.dense_macs,
                       len(weight_layers(model)) / self.dense_layers, latency, table_s)
