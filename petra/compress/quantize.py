"""Quantization schemes, one registered function each.

A scheme may state ``tolerance``: how far its logits may move from fp32, as a fraction of their
standard deviation (0.1 when unstated); the contract tests hold every scheme to its own.

A scheme maps the fp32 ONNX graph of a (pruned, fine-tuned) model to its deployable graph:
``fn(proto, ctx) -> proto``. A scheme that must act during the fine-tune (QAT) also registers
``prepare=fn(model) -> finalize``: the evaluator calls it before fine-tuning and calls
``finalize()`` after, before export.

Artifact bytes and ONNX Runtime latency as ratios to fp32, measured on digits_cnn (int8_dynamic
also on a 64-256-256-10 MLP):
    scheme        what it does                                              bytes  latency
    none          fp32 weights and compute                                  1.0    1.0
    fp16          fp16 weight storage, fp32 compute (casts folded at load)  0.50   ~1.0
    int8_static   QDQ int8 weights and activations, int8 kernels            0.24   ~0.75
    int8_dynamic  int8 weights of MatMul/Gemm/LSTM and embedding tables,    CNN ~1.0  ~1.0
                  activations quantized at run time                         MLP 0.25  ~0.85
    qat           int8_static after a fine-tune on its int8 weight grid     0.24   ~0.8
    int4_weight   packed 4-bit weights (petra.candidate.artifact), fp32 compute;      0.13   ~1.0
                  recurrent (GRU/LSTM) weights and embedding tables too

Beside this module: :mod:`petra.compress.int4` (``int4_weight``), :mod:`petra.compress.tables`
(per-channel grids, int8 embedding rows) and :mod:`petra.compress.calibrate` (SmoothQuant and
the sensitivity behind float fallback).

The static schemes (``int8_static``, ``int8_static_linear``, ``qat``; registry meta
``static=True``) take their options from genes (:class:`StaticOptions`): the calibration method,
SmoothQuant's alpha, and the share of weight layers kept in float, most sensitive first.

``int8_static`` emits QDQ int8 with per-channel weights, which ONNX Runtime runs with int8 kernels
(QLinearConv / QGemm after its QDQ fusions).

Transformers. On a BERT (6 layers, hidden 384, 12 heads, FFN 1536, vocab 4096; 12.4M
parameters, the embedding tables 14% of them), ORT 1.32, 1 thread, batch 8 x 32 tokens, four
calibration batches of 8 x 32; cosine of the mean-pooled ``last_hidden_state`` to fp32 on 64
random sequences. "random": BertModel's own init (std 0.02), whose output is mostly its
embeddings (cosine 0.85 to them); "stress": init std 0.05 (the layers make the output) and
LayerNorm gains x20 on 4 hidden dims, the outlier channels of trained BERTs:
    scheme               bytes  latency  cosine random  cosine stress (min)
    fp16                 0.50   1.0      1.0000         1.0000
    int4_weight          0.11   1.0      0.9875         0.9857 (0.978)
    int8_dynamic         0.23   0.40     0.9999         0.9995 (0.999)
    int8_static          0.22   0.45     0.9995         0.9921 (0.978)
    int8_static_linear   0.23   0.43     0.9999         0.9995 (0.999)
    .. percentile        0.23   0.45     0.9999         0.9995 (0.999)
    .. entropy           0.23   0.44     0.9999         0.9995 (0.999)
    .. smooth_alpha 0.5  0.20*  0.42     0.9999         0.9998 (0.9996)

(".." is int8_static_linear with the gene set as shown: ``quant.calibration``,
``quant.smooth_alpha``; see :class:`StaticOptions`.)
* 0.23 on "random", where nothing is smoothed (no outlier channels); on "stress" the migrated
weights deflate better.
Latency ratios moved by up to 0.05 between runs on this shared machine (0.1 for int8_static).
With the embedding tables left fp32, int8_dynamic was 0.33 of the bytes and int4_weight 0.24.
A trained MiniLM (STACK.md) is far less forgiving than these models: whole-graph static int8
fell to cosine 0.44 there, so treat the cosines above as an upper bound.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from petra.candidate.artifact import quiet_output
from petra.compress.calibrate import (
    index_nodes,
    mask_nodes,
    most_sensitive,
    multi_dim_params,
    smooth_quant,
    weight_nodes,
)
from petra.compress.tables import (  # noqa: F401  (re-exported)
    INT8_QMAX,
    embedding_tables,
    int8_embeddings,
    symmetric_grid,
)
from petra.registry import QUANTIZATION

if TYPE_CHECKING:
    from torch import nn

# The int8 weight grid of ONNX Runtime's reduce_range=True (quant_utils.ONNX_INT_TYPE_REDUCED_RANGE):
# symmetric per channel, q in [-64, 64], scale = max|w| / 64. QAT trains on exactly this grid, so
# the conversion to int8 re-finds the fine-tuned values (BatchNorm folding scales whole output
# channels, which leaves a per-channel grid a grid).
INT8_REDUCED_QMAX = 64
INT4_QMAX = 7


#: Calibration methods of the static schemes (the ``quant.calibration`` gene), in the order a
#: config lists them by default.
CALIBRATIONS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class StaticOptions:
    """The genes of the static int8 schemes (registry meta ``static=True``).

    Attributes:
        calibration: how activation ranges are set: ``minmax``, ``percentile`` (99.999th) or
            ``entropy`` (KL-optimal), one of :data:`CALIBRATIONS` (gene ``quant.calibration``).
        smooth_alpha: SmoothQuant's migration strength; 0 smooths nothing
            (gene ``quant.smooth_alpha``).
        fallback: the share of weight layers (MatMul/Gemm/Conv with an initializer weight)
            kept in float, most sensitive first (:func:`sensitivity`; gene ``quant.fallback``).
    """

    calibration: str = "minmax"
    smooth_alpha: float = 0.0
    fallback: float = 0.0

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {list(CALIBRATIONS)}; "
                             f"got {self.calibration!r}")
        if not 0.0 <= self.smooth_alpha <= 1.0 or not 0.0 <= self.fallback <= 1.0:
            raise ValueError("smooth_alpha and fallback must lie in [0, 1]")


@dataclass
class QuantContext:
    """Calibration data for a scheme: input batches as ONNX Runtime feeds (input name → numpy
    array), one dict per batch; and the options of the static schemes."""

    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    static: StaticOptions = field(default_factory=StaticOptions)


@QUANTIZATION.register("none", description="keep fp32 weights and activations", int8=False)
def none(proto: Any, ctx: QuantContext) -> Any:
    return proto


# --- fp16 -------------------------------------------------------------------------------------

_FP16_MIN_SIZE = 16  # smaller float tensors (scales, scalars) stay fp32; they do not count
_FP16_MAX = 65504.0


@QUANTIZATION.register(
    "fp16",
    description="fp16 weight storage, cast to fp32 at load: ~0.5x bytes, latency as dense",
    int8=False,
    weights="fp16",
)
def fp16(proto: Any, ctx: QuantContext) -> Any:
    # Weights become float16 initializers, each followed by Cast(to=FLOAT): the graph still
    # computes in fp32 and ONNX Runtime folds the casts into fp32 constants at session load.
    # ORT's own converter (onnxruntime.transformers.float16) makes the whole graph fp16 instead;
    # on this machine's CPU provider (ORT 1.32, AVX2) that measured the same latency (it runs
    # fp32 kernels behind inserted casts) and gave no smaller file, so the explicit form was
    # kept: its numerics do not depend on which fp16 kernels a provider happens to have.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    graph_inputs = {i.name for i in graph.input}
    initializers, casts = [], []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if (init.name in graph_inputs or array.dtype != np.float32 or array.size < _FP16_MIN_SIZE
                or not np.all(np.abs(array) <= _FP16_MAX)):
            initializers.append(init)
            continue
        stored = f"{init.name}.fp16"
        initializers.append(numpy_helper.from_array(array.astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [init.name], name=f"{init.name}.cast",
                                      to=TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


# --- int8: ONNX Runtime static (QDQ) and dynamic ----------------------------------------------


def _quiet_ort_quantization() -> None:
    import logging

    import onnxruntime

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    onnxruntime.set_default_logger_severity(3)  # the quantizers' own sessions' graph warnings


def _through_ort(proto: Any, quantize: Callable[[str, str], None]) -> Any:
    """Run one of ORT's file-based quantizers on ``proto``: pre-process (shape inference and
    graph optimizations), then ``quantize(pre_path, out_path)``; returns the quantized graph."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _quiet_ort_quantization()
    with tempfile.TemporaryDirectory(prefix="petra-q-") as tmp, quiet_output():
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize(str(pre), str(dst))
        return onnx.load(dst)


def _calibration_reader(ctx: QuantContext) -> Any:
    """An ORT ``CalibrationDataReader`` over the context's feeds, read in strides (see
    ``CalibStridedMinMax`` in :func:`_ort_static_qdq`)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(ctx.calibration))

        def __len__(self) -> int:
            return len(ctx.calibration)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._batches = iter(ctx.calibration[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return Reader()


#: ORT calibration methods by petra's name for them, with their ``extra_options``.
#: Percentile keeps 99.999% of each tensor's values (ORT's default) in a 2048-bin histogram;
#: entropy picks the range minimizing the KL divergence of the 128-level histogram. Both keep
#: every calibrated tensor of every batch they are given in memory before histogramming it, so
#: batches are handed over one at a time (ORT's ``CalibStridedMinMax`` stride, which works for
#: any calibrator): on a 6 x 384 BERT with 16 batches of 32 x 32 tokens that took their peak
#: memory from 4.1 GB to 0.8 GB; they took 34 s (percentile) and 22 s (entropy) there, min-max
#: 11 s; with 4 batches of 8 x 32, 4 s, 6 s and 3 s.
_CALIBRATION = {
    "minmax": ("MinMax", {}),
    "percentile": ("Percentile", {"CalibPercentile": 99.999}),
    "entropy": ("Entropy", {}),
}


def _ort_static_qdq(proto: Any, ctx: QuantContext, scheme: str, *,
                    linear_only: bool = False) -> Any:
    """ORT static QDQ int8: per-channel 7-bit weights, uint8 per-tensor activations, with the
    calibration, SmoothQuant and float fallback of ``ctx.static`` (:class:`StaticOptions`).

    Args:
        proto: the fp32 graph.
        ctx: its calibration feeds and the static options.
        scheme: the scheme's name, for errors.
        linear_only: quantize only the Linear layers (MatMul/Gemm with a weight); everything
            else (attention's MatMuls, LayerNorm, Softmax, GELU, residual Adds) stays float and
            the embedding tables get per-row int8 storage. False: every op ORT can quantize.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not ctx.calibration:
        raise ValueError(f"{scheme} needs calibration batches")
    options = ctx.static
    method, extra = _CALIBRATION[options.calibration]
    extra = {**extra, "CalibStridedMinMax": 1}
    if options.smooth_alpha > 0:
        proto = smooth_quant(proto, ctx, options.smooth_alpha)

    def quantize(pre: str, dst: str) -> None:
        # Node names are read off the pre-processed graph, which is what ORT quantizes.
        graph = onnx.load(pre)
        weighted = weight_nodes(graph, linear_only=linear_only)
        kept_float = most_sensitive(graph, weighted, ctx, options.fallback)
        kept_float |= set(index_nodes(graph)) | set(multi_dim_params(graph))  # index math, norms
        if not linear_only:  # and so do the masks (the Linear-only scheme never reads them)
            kept_float |= set(mask_nodes(graph, ctx))
        nodes = [n for n in weighted if n not in kept_float] if linear_only else None
        if nodes == []:
            onnx.save(graph, dst)  # nothing to quantize: ORT would quantize everything
            return
        quantize_static(
            pre, dst, _calibration_reader(ctx),
            # reduce_range: 7-bit weights. Without it, the u8s8 kernels of CPUs without VNNI
            # saturate (VPMADDUBSW) and a digits CNN lost 2.8 points; with it, none.
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method), nodes_to_quantize=nodes,
            nodes_to_exclude=sorted(kept_float) or None,
            op_types_to_quantize=["MatMul", "Gemm"] if linear_only else None,
            extra_options={**extra, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}
            if linear_only else extra,
        )

    out = _through_ort(proto, quantize)
    return int8_embeddings(_float_for_other_readers(out)) if linear_only else out


def _float_for_other_readers(proto: Any) -> Any:
    """Give every reader of a quantized activation other than a MatMul/Gemm the float tensor.

    ORT's QDQ quantizer rewires *every* reader of a tensor it quantizes to the dequantized copy,
    so a post-LN BERT's residual Add would carry the int8 rounding of the LayerNorm output the
    next Linear layer reads; only the Linear layers should see it.
    """
    producers = {o: n for n in proto.graph.node for o in n.output}
    source = {}  # DequantizeLinear output -> the float tensor its QuantizeLinear read
    for node in proto.graph.node:
        quantizer = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantizer is not None and quantizer.op_type == "QuantizeLinear":
            source[node.output[0]] = quantizer.input[0]
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "QuantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in source:
                node.input[i] = source[name]
    return proto


@QUANTIZATION.register(
    "int8_static",
    description="static int8 (QDQ) over the whole graph: per-channel int8 weights, uint8 "
    "activations (for CNNs; a transformer loses its accuracy; GRU and LSTM weights stay fp32); "
    "calibration, SmoothQuant and float fallback are genes",
    int8=True,
    static=True,
    weights="int8",
)
def int8_static(proto: Any, ctx: QuantContext) -> Any:
    return _ort_static_qdq(proto, ctx, "int8_static")


# The transformer variants below quantize the Linear layers only. What a MiniLM-shaped BERT
# measured (STACK.md): static QDQ over the whole graph, cosine 0.44 to fp32; MatMul/Gemm only,
# 0.94. LayerNorm, Softmax and GELU outputs and the residual stream have a few outlier channels
# that per-tensor uint8 activations cannot hold, so those ops stay float. The embedding tables,
# half the weights of a small BERT, are stored in per-row int8 (int8_embeddings).

@QUANTIZATION.register(
    "int8_static_linear",
    description="static int8 (QDQ) of the Linear layers only; attention products, LayerNorm, "
    "Softmax, GELU and residuals stay float; per-row int8 embeddings",
    int8=True,
    static=True,
    weights="int8",
    applies_to=("Linear", "Embedding"),
)
def int8_static_linear(proto: Any, ctx: QuantContext) -> Any:
    return _ort_static_qdq(proto, ctx, "int8_static_linear", linear_only=True)


# GRU is left out: ORT 1.32 has no dynamic int8 GRU (its IntegerOpsRegistry lists LSTM, not GRU),
# so a GRU stays fp32 whatever this list says; Gemm is rewritten to MatMul + Add and quantized.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm", "LSTM", "Attention")


@QUANTIZATION.register(
    "int8_dynamic",
    description="dynamic int8: per-channel int8 weights of Linear (MatMul/Gemm) and LSTM layers "
    "and per-row int8 embedding tables; convs and GRUs stay fp32, so a CNN barely shrinks",
    int8=False,
    weights="int8",
    applies_to=("Linear", "LSTM", "Embedding"),
)
def int8_dynamic(proto: Any, ctx: QuantContext) -> Any:
    # Convs are left out on purpose: ORT runs dynamically quantized convs as ConvInteger, which
    # is slower than fp32 Conv on CPU; Linear and recurrent layers get faster (STACK.md).
    # Embedding tables (Gather) are quantized by int8_embeddings, per row, not by ORT, whose
    # dynamic Gather is one uint8 grid for the whole table whatever per_channel says.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    return int8_embeddings(_through_ort(proto, lambda pre, dst: quantize_dynamic(
        pre, dst, op_types_to_quantize=list(DYNAMIC_OP_TYPES),
        # reduce_range for the same reason as int8_static: u8 activations times s8 weights
        # saturate on CPUs without VNNI.
        per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
    )))


# --- QAT --------------------------------------------------------------------------------------


def fake_quantize(weight: Any, qmax: int = INT8_REDUCED_QMAX) -> Any:
    """``weight`` rounded to its symmetric per-output-channel grid (axis 0), straight-through.

    The scale is ``max|w| / qmax`` per output channel, recomputed at every call; the forward value
    is ``clamp(round(w / scale), -qmax, qmax) * scale`` and the gradient passes through unchanged.
    """
    import torch

    dims = tuple(range(1, weight.dim()))
    scale = weight.detach().abs().amax(dim=dims, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.clamp(torch.round(weight.detach() / safe), -qmax, qmax) * scale
    return weight + (quantized - weight.detach()).detach()


def qat_prepare(model: nn.Module) -> Callable[[], None]:
    """Fake-quantize every Conv/Linear weight of ``model`` in its forward until ``finalize()``.

    Each layer's forward is replaced on the instance (parameter names stay ``<layer>.weight``, so
    the fine-tune's pruning masks and optimizer see the usual parameters; torch parametrizations
    would rename them ``<layer>.parametrizations.weight.original``). ``finalize()`` writes the
    fake-quantized values into the weights and restores the class forward, leaving plain
    modules whose weights lie on the int8 grid that ``_ort_static_qdq`` quantizes to.
    """
    from torch import nn
    from torch.nn import functional as F

    from petra.compress.kinds import WEIGHTED_LAYERS

    layers = [m for m in model.modules()
              if isinstance(m, WEIGHTED_LAYERS)
              and "forward" not in vars(m)]

    def quantized_forward(module: Any) -> Callable[[Any], Any]:
        if isinstance(module, nn.Linear):
            return lambda x: F.linear(x, fake_quantize(module.weight), module.bias)
        return lambda x: module._conv_forward(x, fake_quantize(module.weight), module.bias)

    for layer in layers:
        layer.forward = quantized_forward(layer)

    def finalize() -> None:
        import torch

        with torch.no_grad():
            for layer in layers:
                del layer.forward
                layer.weight.copy_(fake_quantize(layer.weight))

    return finalize


@QUANTIZATION.register(
    "qat",
    description="int8_static after a fine-tune with per-channel weights fake-quantized on its "
    "7-bit grid (plain int8_static when there is no fine-tune)",
    int8=True,
    static=True,
    weights="int8",
    prepare=qat_prepare,
)
def qat(proto: Any, ctx: QuantContext) -> Any:
    return _ort_static_qdq(proto, ctx, "qat")
