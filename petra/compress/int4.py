"""``int4_weight``: packed 4-bit weight storage, bias-corrected, rebuilt to fp32 at load.

Conv, Gemm, MatMul and recurrent weights and embedding tables are stored on a symmetric
per-channel int4 grid (:func:`int4_grid`), two values a byte (:mod:`petra.candidate.artifact` packs and
unpacks them); the shift the rounding gives each output's mean is folded into its bias where
there is one (bias correction, from the calibration batches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from petra.candidate.artifact import INT4_KEY
from petra.compress.quantize import INT4_QMAX, QuantContext
from petra.compress.tables import embedding_tables, symmetric_grid
from petra.registry import QUANTIZATION

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
    along ``axis``) is the stored weight: the same expression :mod:`petra.candidate.artifact` decodes with.
    """
    return symmetric_grid(array, axis, INT4_QMAX)


#: Recurrent operators, whose input (W) and recurrent (R) weights are [directions, gates * H,
#: inputs]: their gate rows are the channels. ORT has no int8 GRU, but storage is not compute.
_RECURRENT = ("GRU", "LSTM", "RNN")


def _int4_targets(graph: Any, initializers: dict[str, np.ndarray]) -> list[_Int4Target]:
    """The Conv, Gemm, MatMul and recurrent weights and the embedding tables (Gather on axis 0,
    int4 per row) worth storing in int4, each once."""
    targets, seen = [], set()
    tables = set(embedding_tables(graph, initializers))
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in tables and node.input[0] not in seen:
            seen.add(node.input[0])
            targets.append(_Int4Target(node, node.input[0], 0))
            continue
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
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's graph warnings are not the user's to read
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
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
    weights="int4",
    # 15 levels per channel are coarser than int8's: logits move more (a stated tolerance, as a
    # fraction of the logits' spread; the contract checks it, and that argmax mostly holds).
    tolerance=0.25,
)
def int4_weight(proto: Any, ctx: QuantContext) -> Any:
    # Conv/Gemm/MatMul weights are replaced by their int4 grid values in fp32 and listed with
    # their scales under petra.candidate.artifact.INT4_KEY; artifact.pack() stores them as nibbles and
    # artifact.unpack() rebuilds the same fp32 values, so the graph needs no int4 kernels. (ONNX
    # INT4 + DequantizeLinear would need opset 21 and leave a dequantize in the run-time graph.)
    # Rounding to 4 bits shifts each output channel's mean; with calibration batches the shift
    # E[(W_q - W) x] is measured on the fp32 graph and subtracted from the bias (bias correction,
    # Nagel et al. 2019). On digits CNNs this halved the logit error of plain rounding.
    import onnx
    from onnx import numpy_helper

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
