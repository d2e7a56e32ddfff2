"""What static int8 learns from calibration batches, on an ONNX graph.

- :func:`tensor_values` and :func:`channel_absmax`: intermediate tensors, and their
  per-channel peaks, read by running the graph with them as outputs;
- :func:`smooth_quant`: SmoothQuant's function-preserving migration of activation outliers
  into the weights (the ``quant.smooth_alpha`` gene);
- :func:`sensitivity` and :func:`most_sensitive`: the op-wise quantization sensitivity of the
  weight layers, and the share of them kept in float (the ``quant.fallback`` gene);
- :func:`index_nodes` and :func:`mask_nodes`: the float computations of indices, and the
  masks' huge values, which stay float.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from petra.compress.quantize import QuantContext


def weight_nodes(proto: Any, *, linear_only: bool) -> list[str]:
    """Names of the nodes that hold a layer's weight: MatMul/Gemm whose second input is a 2-D
    initializer (the Linear layers, not attention's Q·Kᵀ and P·V) and, unless ``linear_only``,
    Conv nodes with an initializer weight; in graph order."""
    from onnx import numpy_helper

    dims = {i.name: numpy_helper.to_array(i).ndim for i in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        weight = dims.get(n.input[1]) if len(n.input) > 1 else None
        if (n.op_type in ("MatMul", "Gemm") and weight == 2) or (
                not linear_only and n.op_type == "Conv" and weight is not None):
            out.append(n.name)
    return out


def multi_dim_params(proto: Any) -> list[str]:
    """Names of the normalizations with a scale or bias of two or more dimensions: a
    ``LayerNorm([C, H, W])``'s. ORT's QDQ quantizer takes a norm's parameters per channel, one
    value a channel, and failed there with numpy's "truth value of an array" ``ValueError`` (its
    int32 bias check); with that check off, the quantized graph failed in ONNX Runtime's
    DequantizeLinear. Such a norm stays float. (An ``Add`` of a positional table is quantized
    per tensor, and is left to ORT.)"""
    dims = {i.name: len(i.dims) for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.name and n.op_type.endswith("Normalization")
            and any(dims.get(name, 0) > 1 for name in n.input[1:3])]


def index_nodes(proto: Any) -> list[str]:
    """Names of the nodes whose outputs flow only into integers: a float computation of
    indices, cast to an integer type at its end (T5's and MPNet's relative-position buckets,
    ``log(n / max_exact)``). Quantized, the ``log(0) = -inf`` of its calibration gave a NaN
    scale and indices past every table."""
    from onnx import TensorProto

    ints = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
            TensorProto.UINT8, TensorProto.BOOL}
    nodes = list(proto.graph.node)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    graph_outputs = {o.name for o in proto.graph.output}
    to_int = [False] * len(nodes)
    for i in reversed(range(len(nodes))):  # topological order: every reader decided first
        node = nodes[i]
        to_int[i] = (node.op_type == "Cast" and next(
            (a.i for a in node.attribute if a.name == "to"), None) in ints) or all(
            o not in graph_outputs and readers.get(o) and all(to_int[r] for r in readers[o])
            for o in node.output)
    return [n.name for n, out in zip(nodes, to_int, strict=True) if n.name and out]


def mask_nodes(proto: Any, ctx: QuantContext, limit: float = 1e4) -> list[str]:
    """Names of the nodes that make or read a float tensor of magnitude ``limit`` or more on the
    calibration batches: an attention mask's ``finfo.min`` (or -inf). Quantized to uint8 with
    such a range, every real attention score rounded to 0: a padded XLM-R, StableLM's causal
    mask and Starcoder2's fell to chance, and nothing failed."""
    from onnx import TensorProto

    floats = {v.name for v in proto.graph.value_info
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    made = [o for node in proto.graph.node for o in node.output if o in floats]
    first = replace(ctx, calibration=ctx.calibration[:1])  # a mask is in every batch
    huge = {name for i in range(0, len(made), 64)  # 64 tensors a run bound the memory held
            for name, value in tensor_values(proto, made[i:i + 64], first)
            if value.size and not np.all(np.abs(value) < limit)}
    return [n.name for n in proto.graph.node if n.name and huge.intersection([*n.input, *n.output])]


def sensitivity(proto: Any, nodes: list[str], ctx: QuantContext) -> dict[str, float]:
    """How much each weight node's output moves when its input and weight alone are int8.

    For node ``y = x·W`` (MatMul/Gemm) the relative error ``‖x̂·Ŵ − x·W‖ / ‖x·W‖`` on the
    first calibration batch, with ``x̂`` on the uint8 min-max grid of ``x`` over every
    calibration batch and ``Ŵ`` on the 7-bit per-output-channel grid static int8 uses. A Conv
    is scored without running it: ``√(ex² + ew²)`` of the relative errors of its input and its
    weight. One ONNX Runtime pass over the calibration batches reads every input. This is the
    local, one-layer-at-a-time sensitivity of NNCF's and Neural Compressor's accuracy-aware
    fallback, not a re-measure of the model per layer.
    """
    from onnx import numpy_helper

    by_name = {n.name: n for n in proto.graph.node}
    arrays = {i.name: i for i in proto.graph.initializer}
    inputs = sorted({by_name[n].input[0] for n in nodes})
    seen: dict[str, list[np.ndarray]] = {}
    for name, values in tensor_values(proto, inputs, ctx):
        seen.setdefault(name, []).append(values)
    out = {}
    for name in nodes:
        node = by_name[name]
        batches = seen.get(node.input[0])
        if not batches:
            continue
        lo = min(0.0, min(float(b.min()) for b in batches))
        hi = max(0.0, max(float(b.max()) for b in batches))
        x = batches[0].astype(np.float32)
        scale = (hi - lo) / 255 or 1.0
        zero = np.round(-lo / scale)
        x_hat = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
        weight = numpy_helper.to_array(arrays[node.input[1]]).astype(np.float32)
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Conv":
            w_hat = _on_grid(weight, axis=0)
            out[name] = float(np.hypot(_relative(x_hat, x), _relative(w_hat, weight)))
            continue
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            weight = weight.T
        w_hat = _on_grid(weight, axis=1)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[1] != weight.shape[0]:
            continue
        reference = rows @ weight
        out[name] = _relative(x_hat.reshape(rows.shape) @ w_hat, reference)
    return out


def _on_grid(weight: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` rounded to the symmetric 7-bit grid of each slice along ``axis``."""
    from petra.compress.quantize import INT8_REDUCED_QMAX

    dims = tuple(d for d in range(weight.ndim) if d != axis)
    scale = np.abs(weight).max(axis=dims, keepdims=True) / INT8_REDUCED_QMAX
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(weight / scale), -INT8_REDUCED_QMAX, INT8_REDUCED_QMAX) * scale


def _relative(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / max(float(np.linalg.norm(exact)), 1e-12))


def most_sensitive(proto: Any, nodes: list[str], ctx: QuantContext, share: float) -> set[str]:
    """The ``round(share * len(nodes))`` nodes of ``nodes`` with the largest
    :func:`sensitivity`: the layers a static scheme keeps in float."""
    count = int(round(share * len(nodes)))
    if count <= 0 or not nodes:
        return set()
    scores = sensitivity(proto, nodes, ctx)
    return set(sorted(scores, key=lambda n: (-scores[n], nodes.index(n)))[:count])


def tensor_values(proto: Any, names: list[str], ctx: QuantContext
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, value)`` of each tensor of ``names`` (graph inputs or node outputs) on each
    calibration batch, read by running ``proto`` with them added to its outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    present = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    for name in names:
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's graph warnings are not the user's to read
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in probe.graph.input}
    fetch = [n for n in names if n not in graph_inputs]
    for feed in ctx.calibration:
        values = dict(zip(fetch, session.run(fetch, feed), strict=True)) if fetch else {}
        values.update({n: feed[n] for n in names if n in feed})
        for name in names:
            if name in values:
                yield name, np.asarray(values[name])


def channel_absmax(proto: Any, names: list[str], ctx: QuantContext) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of the tensors ``names`` over the calibration batches."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensor_values(proto, names, ctx):
        value = np.abs(value.astype(np.float32))
        peak = value.reshape(-1, value.shape[-1]).max(axis=0)
        out[name] = np.maximum(out[name], peak) if name in out else peak
    return out


#: SmoothQuant leaves an activation alone when its largest channel peak is below this multiple
#: of the median peak. LayerNorm outputs of a random-init BERT measured 1.3; the digits CNN's
#: classifier input 3.6 (smoothing it grew the artifact 0.4% for nothing); a BERT LayerNorm with
#: x20 outlier gains, ~20.
_SMOOTH_MIN_SPREAD = 8.0


def smooth_quant(proto: Any, ctx: QuantContext, alpha: float = 0.5,
                 min_spread: float = _SMOOTH_MIN_SPREAD) -> Any:
    """SmoothQuant (Xiao et al. 2023) on the Linear layers of ``proto``; the function is unchanged.

    For each activation ``x`` read by Linear layers (MatMul with a [K, N] weight, or Gemm), with
    ``a_k`` the calibration max of channel k and ``w_k`` the max |weight| of input row k over
    those layers, ``s_k = a_k^alpha / w_k^(1 - alpha)``; the layers then read ``x / s`` (an
    inserted Mul) and hold weights ``s_k * W[k, :]``. Channel outliers of ``x`` move into
    weight rows, where per-channel weight scales hold them, and the activation that static
    int8 quantizes per tensor gets flatter. Activations whose channel peaks spread less than
    ``min_spread`` (max over median) are left alone.

    ONNX Runtime's own ``extra_options={"SmoothQuant": True}`` imports Intel Neural
    Compressor's 2.x ONNX adaptor, which is not installed here (and not worth its
    dependencies); this is the same transform without folding the division into a preceding
    LayerNorm, since a post-LN BERT's LayerNorm output also feeds the residual Add.
    """
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    readers = _linear_readers(graph, arrays)
    if not readers:
        return proto
    peaks = channel_absmax(proto, list(readers), ctx)
    mul_nodes = []
    for activation, nodes in readers.items():
        peak = peaks.get(activation)
        rows = [arrays[n.input[1]].T if trans else arrays[n.input[1]] for n, trans in nodes]
        if peak is None or any(r.shape[0] != peak.size for r in rows) \
                or any(uses[n.input[1]] > 1 for n, _ in nodes):
            continue  # a weight read twice (tied) would be scaled for both readers
        if peak.max() < min_spread * max(float(np.median(peak)), 1e-12):
            continue  # no outlier channels: smoothing would only move rounding into weights
        w_peak = np.max([np.abs(r).max(axis=1) for r in rows], axis=0)
        scale = np.where((peak > 0) & (w_peak > 0),
                         peak ** alpha / np.maximum(w_peak, 1e-12) ** (1 - alpha), 1.0)
        scale = np.clip(scale, 1e-5, 1e5).astype(np.float32)
        smoothed, inverse = f"{activation}.smooth", f"{activation}.smooth_inv"
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inverse))
        mul_nodes.append((activation, helper.make_node(
            "Mul", [activation, inverse], [smoothed], name=f"{activation}.smooth")))
        for node, trans in nodes:
            weight = arrays[node.input[1]]
            scaled = weight * (scale[None, :] if trans else scale[:, None])
            _replace_initializer(graph, node.input[1], scaled.astype(np.float32))
            node.input[0] = smoothed
    _insert_after_producers(graph, mul_nodes)
    return proto


def _linear_readers(graph: Any, arrays: Mapping[str, np.ndarray]
                    ) -> dict[str, list[tuple[Any, bool]]]:
    """Activation → the Linear layers that read it: MatMul with a 2-D float weight, or Gemm
    without ``transA``, each as ``(node, weight is [N, K])`` (Gemm's ``transB``)."""
    readers: dict[str, list[tuple[Any, bool]]] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = arrays.get(node.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32 \
                or node.input[0] in arrays:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        readers.setdefault(node.input[0], []).append(
            (node, node.op_type == "Gemm" and bool(attrs.get("transB", 0))))
    return readers


def _replace_initializer(graph: Any, name: str, array: np.ndarray) -> None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(array, name))


def _insert_after_producers(graph: Any, new: list[tuple[str, Any]]) -> None:
    """Insert each ``(tensor, node)`` right after the node producing ``tensor`` (first for a
    graph input), keeping the graph topologically sorted."""
    after: dict[str, list[Any]] = {}
    for tensor, node in new:
        after.setdefault(tensor, []).append(node)
    ordered = [n for i in graph.input for n in after.pop(i.name, [])]
    for node in graph.node:
        ordered.append(node)
        for output in node.output:
            ordered.extend(after.pop(output, []))
    del graph.node[:]
    graph.node.extend(ordered)


