"""The deployable artifact: an ONNX graph in a small zip container, and its loader.

Layout of a ``.petra`` file (a zip archive, deflated):

    manifest.json   format version, input/output names, the sparse and int4 tensors it holds
    model.onnx      the graph; dense initializers inline, sparse and int4 ones removed
    sparse.npz      for each sparse initializer: ``<key>.mask`` (np.packbits of value != 0)
                    and ``<key>.values`` (the non-zero values, in the tensor's own dtype)
    (manifest)      ``tied``: initializers stored once: each repeats another, as it is or
                    transposed (a tied embedding and output head), rebuilt from it on load
    int4.npz        for each int4 initializer: ``<key>.q4`` (4-bit codes ``q + 8``, two per
                    byte, low nibble first), ``<key>.scale`` (float32, one per channel along the
                    entry's ``axis``) and, when its zeros pay for it, ``<key>.mask`` (then only
                    the non-zero codes are in ``q4``)

An initializer is stored sparse only when its bitmask plus values are smaller than its dense
bytes, so unstructured sparsity counts toward the size exactly where the encoding pays, and int8
sparse weights are encoded the same way as fp32 ones.

An fp32 initializer listed under :data:`INT4_KEY` in the graph's metadata (``int4_weight``)
whose values are exactly ``q * scale`` for integers ``q`` in [-7, 7] is stored as int4, and
:func:`unpack` rebuilds the same fp32 values. An older loader fails on an int4 file (its graph
lacks those weights) rather than misrunning it.

:func:`load` needs only numpy, onnx and onnxruntime: it never imports torch or petra's search
code, and its source can be copied next to an exported model (:func:`loader_source`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from petra.errors import first_line

FORMAT = "petra-artifact/1"
_MIN_SPARSE_SIZE = 64
# Model metadata key: JSON {initializer name: {"axis": int, "scale": [float32 values]}}.
INT4_KEY = "petra.int4"
_INT4_QMAX = 7


def export_onnx(model: Any, example_input: Any, *, opset: int = 17, exporter: str = "") -> Any:
    """Export ``model`` to an ``onnx.ModelProto`` with a dynamic batch axis on every input.

    ``example_input`` is a tensor (input ``input``) or a tuple of tensors, named by
    ``model.input_names`` (a :class:`petra.tasks.contract.TaskModel`); the output is ``output``.

    The TorchScript exporter is used first (it folds BatchNorm into the preceding conv, in
    ~0.2 s where the dynamo exporter takes ~5 s), with the forms of
    :mod:`petra.candidate.onnx_forms`; the dynamo exporter is the fallback for models it cannot
    trace, and the ``exporter`` for models whose TorchScript graph ONNX Runtime refuses or that
    computes something else (:func:`petra.candidate.onnx_forms.prefer`). What either prints
    goes to :data:`EXPORT_LOG`, never to stdout.
    """
    import warnings

    import onnx
    import torch

    from petra.candidate import onnx_forms

    onnx_forms.register_symbolics()  # index_add with its duplicates summed
    inputs = tuple(example_input) if isinstance(example_input, tuple | list) \
        else (example_input,)
    names = list(getattr(model, "input_names", None) or
                 (["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]))
    model.eval()
    axes = onnx_forms.dynamic_axes(model, names, inputs)  # the batch, and padded lengths
    buffer = io.BytesIO()
    dynamo = (exporter or onnx_forms.preferred(model)) == "dynamo"
    # nn.TransformerEncoderLayer's fused inference path (aten::_transformer_encoder_layer_fwd)
    # has no ONNX export: trace the plain computation instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings(), torch.no_grad(), quiet_output():
        warnings.simplefilter("ignore")
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            if dynamo:
                buffer = onnx_forms.dynamo_export(model, inputs, names, axes, opset)
            else:
                torch.onnx.export(
                    model, inputs, buffer, dynamo=False, opset_version=opset,
                    input_names=names, output_names=["output"],
                    dynamic_axes={**axes, "output": {0: "batch"}}, do_constant_folding=True)
        except Exception as first:  # pragma: no cover - models TorchScript cannot trace
            if dynamo:
                raise RuntimeError(f"ONNX export failed: {first_line(first)} (torch.export)"
                                   ) from first
            try:
                buffer = onnx_forms.dynamo_export(model, inputs, names, axes, opset)
            except Exception as second:
                raise RuntimeError(
                    f"ONNX export failed: {first_line(first)} (TorchScript exporter); "
                    f"{first_line(second)} (torch.export)") from second
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    proto = onnx_forms.explicit_pads(strip(onnx.load_from_string(buffer.getvalue())))
    return keep_inputs(proto, names, inputs, axes)


def keep_inputs(proto: Any, names: Sequence[str], inputs: Sequence[Any],
                axes: Any = None) -> Any:
    """Every one of the model's inputs, in order, as the graph's first inputs, where the
    exporter dropped those the compressed model no longer reads: a RoBERTa whose attentions
    were all skipped no longer reads its ``attention_mask``. The artifact keeps the dense
    model's interface, and every batch feeds it as it feeds the dense one."""
    import onnx

    graph = proto.graph
    present = {i.name: i for i in graph.input}
    if all(n in present for n in names):
        return proto
    ordered = [present[name] if name in present else onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(value[:0].detach().cpu().numpy().dtype),
        [(axes or {}).get(name, {}).get(a, size) if a else "batch"
         for a, size in enumerate(value.shape)]) for name, value in zip(names, inputs, strict=True)]
    rest = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend([*ordered, *rest])
    return proto


#: Where :func:`quiet_output` sends what the exporter and quantizers print.
EXPORT_LOG = Path(os.environ.get("PETRA_EXPORT_LOG") or Path(tempfile.gettempdir()) / "petra-export.log")


@contextlib.contextmanager
def quiet_output() -> Any:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and subprocess
    writes too) to :data:`EXPORT_LOG` while the block runs; ``--json`` output stays JSON."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass
    try:
        fds = [sys.stdout.fileno(), sys.stderr.fileno()]
    except (AttributeError, ValueError, io.UnsupportedOperation):
        fds = []  # captured streams (pytest): nothing at the descriptor level to redirect
    saved = [os.dup(fd) for fd in fds]
    with open(EXPORT_LOG, "ab") as log, contextlib.redirect_stdout(io.StringIO()) as out, \
            contextlib.redirect_stderr(io.StringIO()) as err:
        for fd in fds:
            os.dup2(log.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in zip(fds, saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            log.write((out.getvalue() + err.getvalue()).encode(errors="replace"))


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
    int4_marked = _pop_int4_marker(proto)
    sparse_arrays: dict[str, np.ndarray] = {}
    int4_arrays: dict[str, np.ndarray] = {}
    entries = []
    int4_entries = []
    keep = []
    tied = _ties(graph.initializer, exclude=set(int4_marked))
    for init in graph.initializer:
        if init.name in tied:
            continue
        array = numpy_helper.to_array(init)
        if init.name in int4_marked:
            key = f"q{len(int4_entries)}"
            spec = int4_marked[init.name]
            int4_arrays.update(_encode_int4(array, spec["axis"], spec["scale"], key, init.name))
            int4_entries.append({"key": key, "name": init.name, "shape": list(array.shape),
                                 "axis": spec["axis"], "sparse": f"{key}.mask" in int4_arrays})
        elif (encoding := sparse_encoding(array)) is not None:
            key = f"t{len(entries)}"
            flat = array.reshape(-1)
            nonzero = flat != 0
            if encoding == "mask":
                sparse_arrays[f"{key}.mask"] = np.packbits(nonzero)
            else:
                sparse_arrays[f"{key}.index"] = np.flatnonzero(nonzero).astype(_index_dtype(flat.size))
            sparse_arrays[f"{key}.values"] = flat[nonzero]
            entries.append({"key": key, "name": init.name, "shape": list(array.shape),
                            "dtype": array.dtype.str, "encoding": encoding})
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
    if int4_entries:
        manifest["int4"] = int4_entries
    if tied:
        manifest["tied"] = [{"name": n, "of": of, "transpose": t} for n, (of, t) in tied.items()]
    return _zip(manifest, proto, {"sparse.npz": sparse_arrays, "int4.npz": int4_arrays})


def _zip(manifest: dict[str, Any], proto: Any, npz: dict[str, dict[str, np.ndarray]]) -> bytes:
    """The artifact's bytes: the manifest, the graph, and each non-empty ``npz`` member."""
    members = {"manifest.json": json.dumps(manifest, sort_keys=True).encode(),
               "model.onnx": proto.SerializeToString()}
    for member, member_arrays in npz.items():
        if member_arrays:
            arrays = io.BytesIO()
            np.savez(arrays, **member_arrays)
            members[member] = arrays.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, payload in members.items():
            # A fixed timestamp: the same model always packs to the same bytes.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, payload, compresslevel=9)
    return out.getvalue()


def _ties(initializers: Any, exclude: set[str]) -> dict[str, tuple[str, bool]]:
    """Name -> (the earlier initializer it repeats, whether transposed): a tied embedding and
    output head (GPT-2's) export twice, the table and the head's folded transpose. Only those
    that share a type and a set of dimensions are read."""
    from onnx import numpy_helper

    alike: dict[tuple[int, tuple[int, ...]], list[Any]] = {}
    for init in initializers:
        if init.name not in exclude and int(np.prod(init.dims)) >= _MIN_SPARSE_SIZE:
            alike.setdefault((init.data_type, tuple(sorted(init.dims))), []).append(init)
    out: dict[str, tuple[str, bool]] = {}
    for group in (g for g in alike.values() if len(g) > 1):
        seen: list[tuple[str, np.ndarray]] = []
        for init in group:
            array = numpy_helper.to_array(init)
            match = next(((other, transposed) for other, first in seen for transposed in (False, True)
                          if np.array_equal(first.T if transposed else first, array)), None)
            if match is None:
                seen.append((init.name, array))
            else:
                out[init.name] = match
    return out


def _index_dtype(size: int) -> type:
    return np.uint16 if size <= 1 << 16 else np.uint32


def sparse_encoding(array: np.ndarray) -> str | None:
    """The smallest way to store ``array``: ``"mask"`` (bitmask + non-zero values), ``"index"``
    (positions + values; wins above ~97% sparsity), or None (dense is smallest)."""
    if array.size < _MIN_SPARSE_SIZE or array.dtype.kind not in "fiu":
        return None
    nnz = int(np.count_nonzero(array))
    sizes = {
        None: array.nbytes,
        "mask": (array.size + 7) // 8 + nnz * array.itemsize,
        "index": nnz * (np.dtype(_index_dtype(array.size)).itemsize + array.itemsize),
    }
    return min(sizes, key=lambda k: (sizes[k], k is not None))


def _pop_int4_marker(proto: Any) -> dict[str, dict[str, Any]]:
    """Remove the :data:`INT4_KEY` metadata from ``proto``; return what it listed."""
    marked: dict[str, dict[str, Any]] = {}
    for prop in list(proto.metadata_props):
        if prop.key == INT4_KEY:
            marked.update(json.loads(prop.value))
            proto.metadata_props.remove(prop)
    return marked


def _encode_int4(
    array: np.ndarray, axis: int, scale: list[float], key: str, name: str
) -> dict[str, np.ndarray]:
    """The ``int4.npz`` members of one initializer; it must lie exactly on its int4 grid."""
    problem = f"initializer {name!r} is marked int4 in {INT4_KEY!r} but"
    if array.dtype != np.float32:
        raise ValueError(f"{problem} it is {array.dtype}, not float32")
    scales = np.asarray(scale, dtype=np.float32)
    shape = [1] * array.ndim
    shape[axis] = -1
    broadcast = scales.reshape(shape)
    ratio = np.divide(array, broadcast, out=np.zeros_like(array), where=broadcast > 0)
    q = np.clip(np.rint(ratio), -_INT4_QMAX, _INT4_QMAX).astype(np.int8)
    if not np.array_equal(q.astype(np.float32) * broadcast, array):
        raise ValueError(f"{problem} its values are not q * scale with integer q in [-7, 7]")
    codes = q.reshape(-1)
    members = {f"{key}.scale": scales}
    if (codes.size + 7) // 8 + (np.count_nonzero(codes) + 1) // 2 < (codes.size + 1) // 2:
        members[f"{key}.mask"] = np.packbits(codes != 0)
        codes = codes[codes != 0]
    nibbles = (codes + 8).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    members[f"{key}.q4"] = nibbles[0::2] | (nibbles[1::2] << 4)
    return members


def save(proto: Any, path: str | Path) -> int:
    """Write the artifact for ``proto`` to ``path``; returns its size in bytes."""
    data = pack(proto)
    Path(path).write_bytes(data)
    return len(data)


def unpack(data: bytes) -> Any:
    """The full ``onnx.ModelProto`` of an artifact, dense (and int4-rebuilt) initializers restored."""
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
                dense = np.zeros(size, dtype=dtype)
                if entry.get("encoding", "mask") == "index":
                    where = arrays[entry["key"] + ".index"].astype(np.int64)
                else:
                    where = np.unpackbits(arrays[entry["key"] + ".mask"], count=size).astype(bool)
                dense[where] = arrays[entry["key"] + ".values"]
                proto.graph.initializer.append(numpy_helper.from_array(dense.reshape(shape),
                                                                      entry["name"]))
        if manifest.get("int4"):
            arrays = np.load(io.BytesIO(zf.read("int4.npz")))
            for entry in manifest["int4"]:
                proto.graph.initializer.append(numpy_helper.from_array(
                    _decode_int4(arrays, entry), entry["name"]))
        by_name = {i.name: i for i in proto.graph.initializer}
        for entry in manifest.get("tied", ()):
            source = numpy_helper.to_array(by_name[entry["of"]])
            proto.graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(source.T if entry["transpose"] else source), entry["name"]))
    return proto


def _decode_int4(arrays: Any, entry: dict[str, Any]) -> np.ndarray:
    """The fp32 tensor of one ``int4`` manifest entry: ``q * scale`` along its axis."""
    shape, key = tuple(entry["shape"]), entry["key"]
    size = int(np.prod(shape, dtype=np.int64))
    packed = arrays[key + ".q4"]
    nibbles = np.empty(2 * packed.size, dtype=np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 15, packed >> 4
    if entry["sparse"]:
        nonzero = np.unpackbits(arrays[key + ".mask"], count=size).astype(bool)
        q = np.zeros(size, dtype=np.int8)
        q[nonzero] = nibbles[: int(nonzero.sum())].astype(np.int8) - 8
    else:
        q = nibbles[:size].astype(np.int8) - 8
    scale_shape = [1] * len(shape)
    scale_shape[entry["axis"]] = -1
    return q.reshape(shape).astype(np.float32) * arrays[key + ".scale"].reshape(scale_shape)


def load(source: Any, *, threads: int = 1, providers: Any = ("CPUExecutionProvider",)) -> Any:
    """An ``onnxruntime.InferenceSession`` for an artifact (a path or its bytes; or a graph, not
    packed): ``threads`` intra-op threads, one inter-op thread, sequential execution, all graph
    optimizations, on the execution ``providers`` in order of preference."""
    import onnxruntime as ort

    proto = source if hasattr(source, "graph") else unpack(bytes(
        source if isinstance(source, bytes | bytearray) else Path(source).read_bytes()))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))


def quiet() -> Any:
    """``onnxruntime.RunOptions`` that keep ONNX Runtime's own red log line of a failed run
    quiet, where petra's reason says it once (or a fallback that works follows)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def loader_source() -> str:
    """Standalone Python source of :func:`unpack` and :func:`load`, for exported models."""
    import inspect

    header = (
        '"""Load a petra artifact with numpy, onnx and onnxruntime only."""\n'
        "import io\nimport json\nimport zipfile\nfrom pathlib import Path\nfrom typing import Any\n\n"
        "import numpy as np\n\n"
        f"FORMAT = {FORMAT!r}\n\n\n"
    )
    functions = (unpack, _decode_int4, load)
    return header + "\n\n".join(inspect.getsource(fn) for fn in functions)
