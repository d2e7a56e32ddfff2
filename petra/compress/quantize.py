"""Quantization schemes, one registered function each.

A scheme maps the fp32 ONNX graph of a (pruned, fine-tuned) model to its deployable graph:
``fn(proto, ctx) -> proto``. A scheme that must act during the fine-tune (QAT) also registers
``prepare=fn(model) -> finalize``: the evaluator calls it before fine-tuning and calls
``finalize()`` after, before export. ``int8_static`` emits QDQ int8 with per-channel weights, which
ONNX Runtime runs with int8 kernels (QLinearConv / QGemm after its QDQ fusions).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from petra.registry import QUANTIZATION


@dataclass
class QuantContext:
    """Calibration data for a scheme: input batches as numpy arrays, and the input name."""

    calibration: list[np.ndarray] = field(default_factory=list)
    input_name: str = "input"


@QUANTIZATION.register("none", description="keep fp32 weights and activations", int8=False)
def none(proto: Any, ctx: QuantContext) -> Any:
    return proto


@QUANTIZATION.register(
    "int8_static",
    description="static int8 (QDQ): per-channel int8 weights, uint8 activations, min-max calibrated",
    int8=True,
)
def int8_static(proto: Any, ctx: QuantContext) -> Any:
    import logging

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not ctx.calibration:
        raise ValueError("int8_static needs calibration batches")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(ctx.calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {ctx.input_name: batch}

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="petra-q-") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(dst), Reader(),
            # reduce_range: 7-bit weights. Without it, the u8s8 kernels of CPUs without VNNI
            # saturate (VPMADDUBSW) and a digits CNN lost 2.8 points; with it, none.
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return onnx.load(dst)
