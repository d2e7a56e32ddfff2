"""Writing a deployable bundle: the artifact, a standalone loader, and a short README."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_README = """# {name}

A model compressed by petra. It runs with numpy, onnx and onnxruntime only:

```python
import numpy as np
from load_petra import load   # load_petra.py sits beside this file; it does not need petra

session = load("model.petra", threads=1)        # an onnxruntime.InferenceSession
outputs = session.run(None, {{"{input_name}": inputs.astype(np.float32)}})[0]
```

Inputs have the shape of the task's example batch, `{input_shape}`, with any batch size.

## Recipe

```json
{genome}
```

## Measured on this artifact

| metric | value | dense baseline |
|---|---|---|
{rows}
"""


def write_bundle(
    out_dir: str | Path, *, artifact_bytes: bytes, genome: Mapping[str, Any],
    metrics: Mapping[str, float], baseline: Mapping[str, float], input_shape: list[int],
    name: str = "petra model",
) -> Path:
    """Write ``model.petra``, ``load_petra.py``, ``genome.json``, ``metrics.json`` and
    ``README.md`` into ``out_dir``; returns the directory."""
    from petra.artifact import loader_source

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.petra").write_bytes(artifact_bytes)
    (out / "load_petra.py").write_text(loader_source())
    (out / "genome.json").write_text(json.dumps(dict(genome), indent=2, sort_keys=True))
    (out / "metrics.json").write_text(json.dumps(
        {"metrics": dict(metrics), "baseline": dict(baseline)}, indent=2, sort_keys=True))
    keys = ("val_accuracy", "test_accuracy", "artifact_bytes", "size_ratio", "latency_ms",
            "latency_ratio", "params", "macs")
    rows = "\n".join(
        f"| {k} | {_fmt(metrics[k])} | {_fmt(baseline.get(k, ''))} |" for k in keys if k in metrics
    )
    (out / "README.md").write_text(_README.format(
        name=name, input_name="input", input_shape=input_shape,
        genome=json.dumps(dict(genome), indent=2, sort_keys=True), rows=rows,
    ))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
