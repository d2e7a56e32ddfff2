"""Weights on symmetric per-channel grids, and embedding tables stored int8 per row.

:func:`symmetric_grid` is the grid int8 and int4 storage share; :func:`int8_embeddings` rewrites
a graph's embedding tables (``Gather`` on axis 0 of a 2-D float table) to int8 rows, each with
its own scale, dequantized by the graph at run time (ONNX Runtime's own dynamic Gather
quantization gives a whole table one grid).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def symmetric_grid(array: np.ndarray, axis: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel grid of ``array`` along ``axis``: ``(q int8 in [-qmax, qmax],
    scale f32)`` with ``scale = max|w| / qmax`` per channel; ``q * scale`` (scale broadcast
    along ``axis``) approximates ``array``. An all-zero channel gets scale 0 and q 0."""
    axis = axis % array.ndim
    others = tuple(d for d in range(array.ndim) if d != axis)
    scale = (np.abs(array).max(axis=others) / np.float32(qmax)).astype(np.float32)
    broadcast = scale.reshape([-1 if d == axis else 1 for d in range(array.ndim)])
    ratio = np.divide(array, broadcast, out=np.zeros_like(array), where=broadcast > 0)
    q = np.clip(np.rint(ratio), -qmax, qmax).astype(np.int8)
    return q, scale



#: The int8 grid of embedding rows: symmetric, the full [-127, 127]. A Gather only copies rows
#: and no integer kernel multiplies them, so reduce_range's reason does not apply here.
INT8_QMAX = 127
#: An embedding row shorter than this stays fp32, as for int4 weights.
_EMBEDDING_MIN_ROW = 16


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def embedding_tables(graph: Any, arrays: dict[str, np.ndarray]) -> list[str]:
    """The float32 2-D initializers gathered on axis 0 (``nn.Embedding`` tables), rows of at
    least :data:`_EMBEDDING_MIN_ROW` values, each once."""
    tables: dict[str, None] = {}
    for node in graph.node:
        if node.op_type != "Gather":
            continue
        array = arrays.get(node.input[0])
        if _axis(node) == 0 and array is not None and array.dtype == np.float32 and array.ndim == 2 \
                and array.shape[1] >= _EMBEDDING_MIN_ROW:
            tables[node.input[0]] = None
    return list(tables)


def subgraph_inputs(graph: Any) -> set[str]:
    """The names the nodes of ``graph``'s subgraphs read, at any depth: an exported
    ``EmbeddingBag`` with offsets is a ``Loop`` whose body gathers from the outer graph's table.
    Dropped as unread, that table left an invalid graph (``Nodes in a graph must be
    topologically sorted``), and both schemes that quantize tables were withheld so."""
    from onnx import AttributeProto

    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == AttributeProto.GRAPH else (
                list(attr.graphs) if attr.type == AttributeProto.GRAPHS else [])
            for sub in subs:
                names.update(i for n in sub.node for i in n.input)
                names |= subgraph_inputs(sub)
    return names


def int8_embeddings(proto: Any) -> Any:
    """``proto`` with its embedding tables stored as per-row symmetric int8.

    Each ``Gather(table, ids)`` becomes ``Cast(Gather(q, ids)) * Gather(scale, ids)`` with
    ``q`` int8 [V, H] and ``scale`` float32 [V, 1] (``max|row| / 127``): dequantizing the
    gathered rows costs a multiply per looked-up value, not per table entry at every run.
    ORT's own dynamic Gather quantization (op type "Gather" in quantize_dynamic) ignores
    per_channel and stores one uint8 scale and zero point for the whole table; rows of very
    different norms (frequent and rare words) share one grid then.

    A table that another op reads too (a tied output projection) stays fp32: an int8 copy beside
    it would only add bytes. ``{table}_int8`` and ``{table}_row_scale`` hold the result (ORT
    names its own quantized weights ``{name}_quantized``).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    inner = subgraph_inputs(graph)  # a Loop's body reads the outer graph's tensors by name
    other_readers = inner | {name for node in graph.node if node.op_type != "Gather"
                             or _axis(node) for name in node.input}
    tables = [t for t in embedding_tables(graph, arrays) if t not in other_readers]
    if not tables:
        return proto
    for name in tables:
        q, scale = symmetric_grid(arrays[name], 0, INT8_QMAX)
        graph.initializer.append(numpy_helper.from_array(q, f"{name}_int8"))
        graph.initializer.append(numpy_helper.from_array(scale.reshape(-1, 1), f"{name}_row_scale"))
    ordered = []
    for node in graph.node:
        ordered.append(node)
        if node.op_type != "Gather" or node.input[0] not in tables:
            continue
        name, ids, out = node.input[0], node.input[1], node.output[0]
        # A "petra.rows/" prefix: ORT's own quantizers name their tensors "<tensor>_scale",
        # "<tensor>_quantized"..., and a MatMul reading this Gather's output directly (an
        # nn.TransformerEncoder on its embedding) made "<out>_scale" twice.
        tag = f"petra.rows/{out}"
        node.input[0], node.output[0] = f"{name}_int8", f"{tag}/int8"
        ordered += [
            helper.make_node("Gather", [f"{name}_row_scale", ids], [f"{tag}/scale"],
                             name=f"{tag}/gather_scale"),
            helper.make_node("Cast", [f"{tag}/int8"], [f"{tag}/cast"],
                             name=f"{tag}/cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{tag}/cast", f"{tag}/scale"], [out],
                             name=f"{tag}/dequantize"),
        ]
    del graph.node[:]
    graph.node.extend(ordered)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output} | inner
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto
