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
    int8_dynamic  int8 weights of MatMul/Gemm/LSTM only, activations        CNN ~1.0  ~1.0
                  quantized at run time                                     MLP 0.25  ~0.85
    qat           int8_static after a fine-tune on its int8 weight grid     0.24   ~0.8
    int4_weight   packed 4-bit weights (petra.artifact), fp32 compute;      0.13   ~1.0
                  recurrent (GRU/LSTM) weights too

``int8_static`` emits QDQ int8 with per-channel weights, which ONNX Runtime runs with int8 kernels
(QLinearConv / QGemm after its QDQ fusions).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from petra.registry import QUANTIZATION

# The int8 weight grid of ONNX Runtime's reduce_range=True (quant_utils.ONNX_INT_TYPE_REDUCED_RANGE):
# symmetric per channel, q in [-64, 64], scale = max|w| / 64. QAT trains on exactly this grid, so
# the conversion to int8 re-finds the fine-tuned values (BatchNorm folding scales whole output
# channels, which leaves a per-channel grid a grid).
INT8_REDUCED_QMAX = 64
INT4_QMAX = 7


@dataclass
class QuantContext:
    """Calibration data for a scheme: input batches as ONNX Runtime feeds (input name → numpy
    array), one dict per batch."""

    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)


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

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))


def _through_ort(proto: Any, quantize: Callable[[str, str], None]) -> Any:
    """Run one of ORT's file-based quantizers on ``proto``: pre-process (shape inference and
    graph optimizations), then ``quantize(pre_path, out_path)``; returns the quantized graph."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from petra.artifact import quiet_output

    _quiet_ort_quantization()
    with tempfile.TemporaryDirectory(prefix="petra-q-") as tmp, quiet_output():
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize(str(pre), str(dst))
        return onnx.load(dst)


def _ort_static_qdq(proto: Any, ctx: QuantContext, scheme: str) -> Any:
    """ORT static QDQ int8: per-channel 7-bit weights, uint8 activations, min-max calibrated."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not ctx.calibration:
        raise ValueError(f"{scheme} needs calibration batches")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(ctx.calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return _through_ort(proto, lambda pre, dst: quantize_static(
        pre, dst, Reader(),
        # reduce_range: 7-bit weights. Without it, the u8s8 kernels of CPUs without VNNI
        # saturate (VPMADDUBSW) and a digits CNN lost 2.8 points; with it, none.
        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    ))


@QUANTIZATION.register(
    "int8_static",
    description="static int8 (QDQ): per-channel int8 weights, uint8 activations, min-max calibrated",
    int8=True,
)
def int8_static(proto: Any, ctx: QuantContext) -> Any:
    return _ort_static_qdq(proto, ctx, "int8_static")


# GRU is left out: ORT 1.32 has no dynamic int8 GRU (its IntegerOpsRegistry lists LSTM, not GRU),
# so a GRU stays fp32 whatever this list says; Gemm is rewritten to MatMul + Add and quantized.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm", "LSTM", "Attention")


@QUANTIZATION.register(
    "int8_dynamic",
    description="dynamic int8: per-channel int8 weights of Linear (MatMul/Gemm) and LSTM layers "
    "only; convs and GRUs stay fp32, so a CNN barely shrinks",
    int8=False,
    applies_to=("Linear", "LSTM"),
)
def int8_dynamic(proto: Any, ctx: QuantContext) -> Any:
    # Convs are left out on purpose: ORT runs dynamically quantized convs as ConvInteger, which
    # is slower than fp32 Conv on CPU; Linear and recurrent layers get faster (STACK.md).
    from onnxruntime.quantization import QuantType, quantize_dynamic

    return _through_ort(proto, lambda pre, dst: quantize_dynamic(
        pre, dst, op_types_to_quantize=list(DYNAMIC_OP_TYPES),
        # reduce_range for the same reason as int8_static: u8 activations times s8 weights
        # saturate on CPUs without VNNI.
        per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
    ))


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


def qat_prepare(model: Any) -> Callable[[], None]:
    """Fake-quantize every Conv/Linear weight of ``model`` in its forward until ``finalize()``.

    Each layer's forward is replaced on the instance (parameter names stay ``<layer>.weight``, so
    the fine-tune's pruning masks and optimizer see the usual parameters; torch parametrizations
    would rename them ``<layer>.parametrizations.weight.original``). ``finalize()`` writes the
    fake-quantized values into the weights and restores the class forward, leaving plain
    modules whose weights lie on the int8 grid that ``_ort_static_qdq`` quantizes to.
    """
    from torch import nn
    from torch.nn import functional as F

    layers = [m for m in model.modules()
              if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)
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
    prepare=qat_prepare,
)
def qat(proto: Any, ctx: QuantContext) -> Any:
    return _ort_static_qdq(proto, ctx, "qat")


# --- int4 weight-only -------------------------------------------------------------------------

# A weight with fewer inputs per output channel than this stays fp32: 4 bits on a handful of
# weights (a first conv on a 1-channel image has 9) costs accuracy and saves nothing measurable.
_INT4_MIN_FAN_IN = 16


@dataclass
class _Int4Target:
    node: Any
    weight: str
    axis: int  # the output-channel axis of the weight


def int4_grid(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int4 of ``array`` along ``axis``: ``(q int8 in [-7, 7], scale f32)``.

    ``scale = max|w| / 7`` per channel, and ``q.astype(np.float32) * scale`` (scale broadcast
    along ``axis``) is the stored weight: the same expression :mod:`petra.artifact` decodes with.
    """
    axis = axis % array.ndim
    others = tuple(d for d in range(array.ndim) if d != axis)
    scale = (np.abs(array).max(axis=others) / np.float32(INT4_QMAX)).astype(np.float32)
    broadcast = scale.reshape([-1 if d == axis else 1 for d in range(array.ndim)])
    ratio = np.divide(array, broadcast, out=np.zeros_like(array), where=broadcast > 0)
    q = np.clip(np.rint(ratio), -INT4_QMAX, INT4_QMAX).astype(np.int8)
    return q, scale


#: Recurrent operators, whose input (W) and recurrent (R) weights are [directions, gates * H,
#: inputs]: their gate rows are the channels. ORT has no int8 GRU, but storage is not compute.
_RECURRENT = ("GRU", "LSTM", "RNN")


def _int4_targets(graph: Any, initializers: dict[str, np.ndarray]) -> list[_Int4Target]:
    """The Conv, Gemm, MatMul and recurrent weights worth storing in int4, each once."""
    targets, seen = [], set()
    for node in graph.node:
        if node.op_type in _RECURRENT:
            for name in node.input[1:3]:
                array = initializers.get(name)
                if name and name not in seen and array is not None and array.ndim == 3 \
                        and array.dtype == np.float32 and array.shape[2] >= _INT4_MIN_FAN_IN:
                    seen.add(name)
                    targets.append(_Int4Target(node, name, 1))
            continue
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        array = initializers.get(name)
        if name in seen or array is None or array.dtype != np.float32 or array.ndim < 2:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "Gemm":  # B is [N, K] with transB, else [K, N]
            axis = 0 if attrs.get("transB", 0) else 1
        else:
            axis = array.ndim - 1
        seen.add(name)
        if array.size // array.shape[axis] >= _INT4_MIN_FAN_IN:
            targets.append(_Int4Target(node, name, axis))
    return targets


def _input_means(proto: Any, targets: list[_Int4Target], ctx: QuantContext) -> dict[str, Any]:
    """Per-channel means of each target's input activation over the calibration batches."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    graph_inputs = {i.name for i in probe.graph.input}
    present = {o.name for o in probe.graph.output}
    names = list(dict.fromkeys(t.node.input[0] for t in targets
                               if t.node.op_type in ("Conv", "Gemm")))
    for name in names:
        if name not in graph_inputs | present:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    fetch = [n for n in names if n not in graph_inputs]
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for batch in ctx.calibration:
        feed = batch
        # An empty fetch list would make ORT return every output: read none then.
        values = dict(zip(fetch, session.run(fetch, feed), strict=True)) if fetch else {}
        values.update({n: feed[n] for n in names if n in feed})
        for name, value in values.items():
            value = np.asarray(value, dtype=np.float64)
            axis = 1  # Conv inputs are [N, C, ...], Gemm inputs [M, K]
            flat = np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])
            sums[name] = sums.get(name, 0.0) + flat.sum(axis=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
    return {name: sums[name] / counts[name] for name in sums}


def _bias_shift(target: _Int4Target, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """``E[error · x]`` per output channel: what rounding the weight added to the output mean."""
    attrs = {a.name: a for a in target.node.attribute}
    if target.node.op_type == "Conv":
        groups = attrs["group"].i if "group" in attrs else 1
        out_channels, per_group = error.shape[:2]
        if mean.size != groups * per_group:
            return None
        summed = error.reshape(out_channels, per_group, -1).sum(axis=2)
        return (summed * np.repeat(mean.reshape(groups, per_group), out_channels // groups,
                                   axis=0)).sum(axis=1)
    if target.node.op_type == "Gemm":
        if "transA" in attrs and attrs["transA"].i:
            return None
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        weight = error.T if target.axis == 0 else error  # as [K, N]
        return None if beta == 0 or mean.size != weight.shape[0] else alpha * (mean @ weight) / beta
    return None  # MatMul: no bias input of its own


def _correct_bias(graph: Any, target: _Int4Target, shift: np.ndarray,
                  initializers: dict[str, np.ndarray]) -> None:
    """Subtract ``shift`` from the target's bias (added as an initializer if it has none)."""
    from onnx import numpy_helper

    node = target.node
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias_name is None:
        bias_name = f"{target.weight}.int4_bias"
        bias = np.zeros(shift.shape, dtype=np.float32)
        if len(node.input) > 2:
            node.input[2] = bias_name
        else:
            node.input.append(bias_name)
        graph.initializer.append(numpy_helper.from_array(bias, bias_name))
    else:
        bias = initializers.get(bias_name)
        if bias is None or bias.size != shift.size or bias.dtype != np.float32:
            return
    corrected = (bias.astype(np.float64) - shift.reshape(bias.shape)).astype(np.float32)
    for init in graph.initializer:
        if init.name == bias_name:
            init.CopyFrom(numpy_helper.from_array(corrected, bias_name))
    initializers[bias_name] = corrected


@QUANTIZATION.register(
    "int4_weight",
    description="int4 weight storage (per-channel, 2 weights/byte, biases corrected on "
    "calibration data), fp32 weights rebuilt at load: ~0.15x bytes, latency as dense",
    int8=False,
    # 15 levels per channel are coarser than int8's: logits move more (a stated tolerance, as a
    # fraction of the logits' spread; the contract checks it, and that argmax mostly holds).
    tolerance=0.25,
)
def int4_weight(proto: Any, ctx: QuantContext) -> Any:
    # Conv/Gemm/MatMul weights are replaced by their int4 grid values in fp32 and listed with
    # their scales under petra.artifact.INT4_KEY; artifact.pack() stores them as nibbles and
    # artifact.unpack() rebuilds the same fp32 values, so the graph needs no int4 kernels. (ONNX
    # INT4 + DequantizeLinear would need opset 21 and leave a dequantize in the run-time graph.)
    # Rounding to 4 bits shifts each output channel's mean; with calibration batches the shift
    # E[(W_q - W) x] is measured on the fp32 graph and subtracted from the bias (bias correction,
    # Nagel et al. 2019). On digits CNNs this halved the logit error of plain rounding.
    import onnx
    from onnx import numpy_helper

    from petra.artifact import INT4_KEY

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    targets = _int4_targets(graph, initializers)
    means = _input_means(proto, targets, ctx) if ctx.calibration and targets else {}
    marked = {}
    for target in targets:
        array = initializers[target.weight]
        q, scale = int4_grid(array, target.axis)
        shape = [-1 if d == target.axis else 1 for d in range(array.ndim)]
        stored = q.astype(np.float32) * scale.reshape(shape)
        for init in graph.initializer:
            if init.name == target.weight:
                init.CopyFrom(numpy_helper.from_array(stored, target.weight))
        marked[target.weight] = {"axis": target.axis, "scale": scale.tolist()}
        mean = means.get(target.node.input[0])
        shift = None if mean is None else _bias_shift(target, stored - array, mean)
        if shift is not None:
            _correct_bias(graph, target, shift, initializers)
    for prop in list(proto.metadata_props):
        if prop.key == INT4_KEY:
            proto.metadata_props.remove(prop)
    if marked:
        proto.metadata_props.add(key=INT4_KEY, value=json.dumps(marked, sort_keys=True))
    return proto
