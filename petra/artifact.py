"""The deployable artifact: an ONNX graph in a small zip container, and its loader.

Layout of a ``.petra`` file (a zip archive, deflated):

    manifest.json   format version, input/output names, the sparse tensors it holds
    model.onnx      the graph; dense initializers inline, sparse ones removed
    sparse.npz      for each sparse initializer: ``<key>.mask`` (np.packbits of value != 0)
                    and ``<key>.values`` (the non-zero values, in the tensor's own dtype)

An initializer is stored sparse only when its bitmask plus values are smaller than its dense
bytes, so unstructured sparsity counts toward the size exactly where the encoding pays, and int8
sparse weights are encoded the same way as fp32 ones.

:func:`load` needs only numpy, onnx and onnxruntime: it never imports torch or petra's search
code, and its source can be copied next to an exported model (:func:`loader_source`).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "petra-artifact/1"
_MIN_SPARSE_SIZE = 64


def export_onnx(model: Any, example_input: Any, *, opset: int = 17) -> Any:
    """Export ``model`` to an ``onnx.ModelProto`` with a dynamic batch axis.

    The TorchScript exporter is used first: in eval mode it folds BatchNorm into the preceding
    convolution, and it takes ~0.2 s where the dynamo exporter takes ~5 s. The dynamo exporter
    is the fallback for models the TorchScript one cannot trace.
    """
    import warnings

    import onnx
    import torch

    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (example_input,), buffer, dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                do_constant_folding=True,
            )
        except Exception:  # pragma: no cover - exercised by models TorchScript cannot trace
            buffer = io.BytesIO()
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                model, (example_input,), buffer, dynamo=True, opset_version=max(opset, 18),
                input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: batch},), verbose=False,
            )
    return strip(onnx.load_from_string(buffer.getvalue()))


def strip(proto: Any) -> Any:
    """Drop what the runtime does not need: doc strings, exporter metadata, value_info."""
    proto.doc_string = ""
    proto.producer_name = "petra"
    proto.producer_version = ""
    del proto.metadata_props[:]
    graph = proto.graph
    graph.doc_string = ""
    del graph.value_info[:]
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    return proto


def pack(proto: Any) -> bytes:
    """Serialize ``proto`` into the artifact format; returns the file's bytes."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # leave the caller's alone
    graph = proto.graph
    sparse_arrays: dict[str, np.ndarray] = {}
    entries = []
    keep = []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if _sparse_pays(array):
            key = f"t{len(entries)}"
            flat = array.reshape(-1)
            nonzero = flat != 0
            sparse_arrays[f"{key}.mask"] = np.packbits(nonzero)
            sparse_arrays[f"{key}.values"] = flat[nonzero]
            entries.append({"key": key, "name": init.name, "shape": list(array.shape),
                            "dtype": array.dtype.str})
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    manifest = {
        "format": FORMAT,
        "inputs": [i.name for i in graph.input],
        "outputs": [o.name for o in graph.output],
        "sparse": entries,
    }
    members = {"manifest.json": json.dumps(manifest, sort_keys=True).encode(),
               "model.onnx": proto.SerializeToString()}
    if sparse_arrays:
        arrays = io.BytesIO()
        np.savez(arrays, **sparse_arrays)
        members["sparse.npz"] = arrays.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, payload in members.items():
            # A fixed timestamp: the same model always packs to the same bytes.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, payload, compresslevel=9)
    return out.getvalue()


def _sparse_pays(array: np.ndarray) -> bool:
    if array.size < _MIN_SPARSE_SIZE or array.dtype.kind not in "fiu":
        return False
    nnz = int(np.count_nonzero(array))
    return (array.size + 7) // 8 + nnz * array.itemsize < array.nbytes


def save(proto: Any, path: str | Path) -> int:
    """Write the artifact for ``proto`` to ``path``; returns its size in bytes."""
    data = pack(proto)
    Path(path).write_bytes(data)
    return len(data)


def unpack(data: bytes) -> Any:
    """The full ``onnx.ModelProto`` of an artifact, dense initializers restored."""
    import onnx
    from onnx import numpy_helper

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        manifest = json.loads(zf.read("manifest.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise ValueError(f"not a {FORMAT} file ({exc})") from None
    with zf:
        if manifest.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file; got format {manifest.get('format')!r}")
        proto = onnx.ModelProto.FromString(zf.read("model.onnx"))
        if manifest["sparse"]:
            arrays = np.load(io.BytesIO(zf.read("sparse.npz")))
            for entry in manifest["sparse"]:
                shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
                size = int(np.prod(shape, dtype=np.int64))
                nonzero = np.unpackbits(arrays[entry["key"] + ".mask"], count=size).astype(bool)
                dense = np.zeros(size, dtype=dtype)
                dense[nonzero] = arrays[entry["key"] + ".values"]
                proto.graph.initializer.append(
                    numpy_helper.from_array(dense.reshape(shape), entry["name"])
                )
    return proto


def load(source: str | Path | bytes, *, threads: int = 1) -> Any:
    """An ``onnxruntime.InferenceSession`` for an artifact (a path or its bytes).

    Runs with ``threads`` intra-op threads, one inter-op thread, sequential execution and all
    graph optimizations.
    """
    import onnxruntime as ort

    data = source if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    proto = unpack(bytes(data))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def loader_source() -> str:
    """Standalone Python source of :func:`unpack` and :func:`load`, for exported models."""
    import inspect

    header = (
        '"""Load a petra artifact with numpy, onnx and onnxruntime only."""\n'
        "import io\nimport json\nimport zipfile\nfrom pathlib import Path\nfrom typing import Any\n\n"
        "import numpy as np\n\n"
        f"FORMAT = {FORMAT!r}\n\n\n"
    )
    return header + inspect.getsource(unpack) + "\n\n" + inspect.getsource(load)
