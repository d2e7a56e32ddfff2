"""Only offer quantization schemes that work, and gain something, on the user's model.

:func:`verify_schemes` runs once per model, for each scheme the space allows: the fp32 graph is
quantized, packed, loaded into ONNX Runtime and run. A scheme is withheld, with its reason,
where any of that fails, where it quantizes no operator of the model, and where its artifact of
the dense model is not :data:`~petra.candidate.evaluate.BYTES_MARGIN` smaller than the fp32 one.
Such a scheme quantizes too little of the model to gain: dynamic int8 on a convolutional net
with a small Linear head quantizes the head alone, and its artifact was 0.1-1.4% larger, and
no faster, on four such nets (static int8 on a GRU model: 1.003x the bytes, 1.06x the latency;
on a small seq2seq model: 1.22x and 1.43x). The check reads bytes, not time, so that the same
model is offered the same genes on any machine and under any load. It is made on the dense
model: pruning the rest of a model could raise the share a scheme quantizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from petra.candidate import artifact
from petra.compress.quantize import QuantContext
from petra.errors import first_line
from petra.registry import QUANTIZATION


def verify_schemes(proto: Any, schemes: Sequence[str], calibration: Sequence[Mapping[str, Any]],
                   example_feed: Mapping[str, Any]) -> dict[str, str]:
    """The quantization schemes that fail to quantize, pack, load or run ``proto`` (the fp32
    graph), or that gain nothing on it, each with the reason."""
    import numpy as np

    failed: dict[str, str] = {}
    dense: list[int] = []  # the fp32 artifact's bytes, packed when first needed
    for scheme in schemes:
        if scheme == "none":
            continue
        try:
            quantized = QUANTIZATION.get(scheme).fn(proto, QuantContext(calibration=list(
                calibration)))
            data = artifact.pack(quantized)
            session = artifact.load(data)
            out = session.run(None, dict(example_feed), artifact.quiet())[0]
            if not np.all(np.isfinite(out)):
                raise FloatingPointError("the quantized graph produced non-finite outputs")
            if not any(q - d for q, d in zip(_form(quantized), _form(proto), strict=True)):
                failed[scheme] = ("it quantizes no operator of this model: its graph and weights "
                                  "are the fp32 ones")
                continue
            if not dense:
                dense.append(len(artifact.pack(proto)))
            if why := no_gain(len(data), dense[0]):
                failed[scheme] = why
        except Exception as exc:  # noqa: BLE001 - any failure withholds the scheme
            failed[scheme] = first_line(exc)
    return failed


def no_gain(size: int, dense_size: int) -> str | None:
    """Why a quantized artifact of ``size`` bytes gains nothing on the fp32 one of
    ``dense_size``; None where it is smaller by the bytes margin."""
    from petra.candidate.evaluate import BYTES_MARGIN

    ratio = size / dense_size
    if ratio < 1 - BYTES_MARGIN:
        return None
    return (f"it gains nothing on this model: its artifact is {ratio:.3f}x the fp32 one's (a "
            f"scheme must make it at least {BYTES_MARGIN:.0%} smaller)")


def _form(proto: Any) -> tuple[set[Any], ...]:
    """What a quantization adds to a graph: its operators, its weights' types (not those of
    indices and shapes, which its pre-processing folds out of the graph's constants), and its
    metadata (int4's marker; not ONNX's own)."""
    from onnx import TensorProto

    return ({n.op_type for n in proto.graph.node},
            {i.data_type for i in proto.graph.initializer} - {
                TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL},
            {p.key for p in proto.metadata_props if not p.key.startswith("onnx.")})
