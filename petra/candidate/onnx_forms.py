"""Forms of ordinary PyTorch layers that the TorchScript exporter writes in a way ONNX Runtime
refuses, or that computes something else, mended on the way out.

- ``index_add`` (message passing: ``out.index_add_(dim, dst, messages)``): the exporter's own
  symbolic scatters into zeros and adds, so of several messages to one node only the last
  arrives (a GNN written outside the repo: largest difference 7.2 of 8.5). It is exported as
  ``ScatterElements`` with ``reduction="add"`` (opset 16 and later), which sums them.
- ``nn.Conv2d(..., padding="same", dilation=2)``: the exporter writes ``auto_pad=SAME_UPPER``,
  which ONNX Runtime's optimized convolution refuses with a dilation ("Dilation not supported
  for AutoPadType::SAME_UPPER"). Such a convolution is given its padding explicitly, as
  PyTorch pads it (the odd one at the end).

Some models export with the TorchScript exporter into a graph that ONNX Runtime refuses to
load or run (PatchTST's positional add, Mamba's Tile) or that computes something else
(Longformer's, once trained), where the dynamo exporter's graph is right. The dense export
(:func:`petra.candidate.baseline.export_dense`) then tries the dynamo exporter, and where its
graph passes the same checks, :func:`prefer` makes it the exporter of every model of that
class in the process; the graph says so in its metadata (:data:`EXPORTER_KEY`), from which
each worker's evaluator takes the same choice for the task's candidates.
"""

from __future__ import annotations

from typing import Any

_REGISTERED: list[bool] = []
#: The graph metadata key that names the exporter, where it is not the TorchScript one.
EXPORTER_KEY = "petra.exporter"
#: The exporter chosen for each model class (the user's class under a TaskModel).
_PREFERRED: dict[type, str] = {}


def _root(model: Any) -> type:
    return type(getattr(model, "inner", model))


def prefer(model: Any, exporter: str) -> None:
    """Export every model of ``model``'s class with ``exporter`` (``"dynamo"``) from now on."""
    _PREFERRED[_root(model)] = exporter


def preferred(model: Any) -> str:
    """The exporter chosen for ``model``'s class, or ``""`` (the TorchScript one first)."""
    return _PREFERRED.get(_root(model), "")


def dynamic_axes(model: Any, names: list[str], inputs: tuple[Any, ...]) -> dict[str, Any]:
    """Each input's dynamic axes, named: the batch axis, and those the task's batches vary in
    (``model.varying_axes``, a TaskModel's: dynamic padding); an axis of one size in the
    example is one name across inputs (the ids' and the mask's length)."""
    varying = getattr(model, "varying_axes", None) or {}
    return {n: {0: "batch", **{a: f"axis{a}_{tuple(x.shape)[a]}" for a in varying.get(n, ())}}
            for n, x in zip(names, inputs, strict=False)}


def dynamo_export(model: Any, inputs: tuple[Any, ...], names: list[str],
                  axes: dict[str, Any], opset: int) -> Any:
    """``model`` exported by the dynamo exporter with the dynamic ``axes`` of each input
    (:func:`dynamic_axes`), in a buffer."""
    import io

    import torch

    buffer = io.BytesIO()
    dims: dict[str, Any] = {}
    shapes: Any = tuple({a: dims.setdefault(name, torch.export.Dim(name))
                         for a, name in each.items()} for each in axes.values())
    if hasattr(model, "input_names"):  # a TaskModel takes *inputs: its one argument
        shapes = (shapes,)
    torch.onnx.export(model, inputs, buffer, dynamo=True, opset_version=max(opset, 18),
                      input_names=names, output_names=["output"], dynamic_shapes=shapes,
                      verbose=False)
    return buffer


def register_symbolics() -> None:
    """Register petra's export of ``aten::index_add`` for opset 16 and later (once)."""
    if _REGISTERED:
        return
    import torch

    torch.onnx.register_custom_op_symbolic("aten::index_add", _index_add, 16)
    _REGISTERED.append(True)


def _index_add(g: Any, self: Any, dim: Any, index: Any, other: Any, alpha: Any = None) -> Any:
    """``self`` with ``other``'s slices along ``dim`` added at ``index``, duplicates summed."""
    import torch
    from torch.onnx import symbolic_helper as sh

    dim = sh._maybe_get_const(dim, "i")
    rank, other_rank = sh._get_tensor_rank(self), sh._get_tensor_rank(other)
    scale = sh._maybe_get_scalar(alpha) if alpha is not None else 1
    if not isinstance(dim, int) or rank is None or other_rank != rank or float(scale) != 1:
        from torch.onnx._internal.torchscript_exporter import symbolic_opset9

        return symbolic_opset9.index_add(g, self, dim, index, other, alpha)  # as before
    dim %= rank
    shape = [1] * rank
    shape[dim] = -1  # the index along dim, broadcast over the other axes of ``other``
    index = g.op("Reshape", index, g.op("Constant", value_t=torch.tensor(shape)))
    index = g.op("Expand", index, g.op("Shape", other))
    return g.op("ScatterElements", self, index, other, axis_i=dim, reduction_s="add")


def explicit_pads(proto: Any) -> Any:
    """``proto`` with each stride-1 ``Conv`` of ``auto_pad`` ``SAME_UPPER`` or ``SAME_LOWER``
    given its pads explicitly (in place)."""
    from onnx import helper

    weights = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("auto_pad", b"NOTSET")
        if node.op_type != "Conv" or mode not in (b"SAME_UPPER", b"SAME_LOWER"):
            continue
        kernel = list(attrs.get("kernel_shape") or (
            weights[node.input[1]].dims[2:] if node.input[1] in weights else []))
        if not kernel or any(s != 1 for s in attrs.get("strides", [1] * len(kernel))):
            continue
        total = [d * (k - 1) for d, k in zip(attrs.get("dilations", [1] * len(kernel)), kernel,
                                             strict=True)]
        begin = [t // 2 if mode == b"SAME_UPPER" else t - t // 2 for t in total]
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(
            "pads", begin + [t - b for t, b in zip(total, begin, strict=True)])])
    return proto
