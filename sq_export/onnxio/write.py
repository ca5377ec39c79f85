"""Write an onnx_ir model to an .onnx file one initializer at a time (torch-free: numpy, onnx, onnx-ir).

`ir.to_proto(model)` followed by `SerializeToString()` holds every weight twice more (in the protobuf and in the
bytes object) on top of the tensors themselves. `write_model` serializes the graph with tiny placeholder
tensors instead, and then writes the protobuf wire format itself: the model's fields before `graph`, the graph's
fields before `initializer`, each initializer (its small header, then its data straight from the tensor's memory),
the remaining graph and model fields. Protobuf serializes fields in field-number order, so the file has exactly
the bytes of `ir.to_proto(model)` (+ `edit`) `.SerializeToString()` (tests/test_export_stream.py checks it);
memory beyond the tensors is one tensor's contiguous copy at most (for a tensor that is a strided view).

A model whose file would exceed protobuf's 2 GB limit is written with external data instead: every initializer of
`external_threshold` bytes or more into `<file name>.data` beside it (offsets in order, no padding), as
onnx.save_model(..., save_as_external_data=True, all_tensors_to_one_file=True) lays them out.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

TWO_GB = 2**31 - 1
_WIRE_LEN = 2  # length-delimited
_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data

# dtypes whose raw bytes are the tensor's memory on a little-endian machine (others go through tobytes())
_PLAIN = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.INT8,
          ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32,
          ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int) -> bytes:
    return varint(field << 3 | _WIRE_LEN)


def _split(msg, field: int):
    """(fields numbered below `field`, fields above it) of a message, each as its own message."""
    lo, hi = type(msg)(), type(msg)()
    lo.CopyFrom(msg)
    hi.CopyFrom(msg)
    for fd, _ in msg.ListFields():
        if fd.number >= field:
            lo.ClearField(fd.name)
        if fd.number <= field:
            hi.ClearField(fd.name)
    return lo, hi


def tensor_buffer(t) -> memoryview | bytes:
    """The tensor's raw_data bytes (what `t.tobytes()` returns), without a copy where the memory already is. A
    LazyTensor is computed here, when its bytes are written, and not kept."""
    if isinstance(t, ir.LazyTensor):
        return tensor_buffer(t.raw())  # its thunk: the tensor, made now
    if sys.byteorder == "little" and t.dtype in _PLAIN:
        raw = getattr(t, "raw", None)
        if type(raw).__module__.startswith("torch"):  # onnx_ir TorchTensor (torch is loaded when it holds one)
            import torch

            x = raw.detach().cpu().contiguous().reshape(-1)
            return memoryview(x.view(torch.uint8).numpy())
        if isinstance(raw, np.ndarray) and type(t) is ir.Tensor:
            return memoryview(np.ascontiguousarray(raw).reshape(-1).view(np.uint8))
    return t.tobytes()


class _Record:
    """One initializer as it goes to the file: TensorProto fields before raw_data, the data, fields after it.
    Tensors that serialize otherwise (a TensorProtoTensor is copied verbatim, metadata) go whole (`data` None)."""

    def __init__(self, t):
        self.tensor = t
        self.header = None
        if not isinstance(t, ir.StringTensor):
            tp = onnx.TensorProto()
            if t.name:
                tp.name = t.name
            if t.doc_string:
                tp.doc_string = t.doc_string
            tp.data_type = t.dtype.value
            tp.dims.extend(t.shape.numpy())
            self.header = tp
        self.nbytes = t.nbytes
        # TorchTensor is an ir.Tensor; an ExternalTensor (a model loaded with external data) is read and written
        # inline, so that the file written never points into the input's data file; a LazyTensor (the qdq16
        # weights) is computed only when its bytes are written, one at a time
        if self.header is None or not isinstance(t, (ir.Tensor, ir.ExternalTensor, ir.LazyTensor)) or t.metadata_props:
            self.lo, self.data, self.hi = ir.serde.serialize_tensor(t).SerializeToString(), None, b""
            return
        lo, hi = _split(self.header, _TENSOR_RAW_DATA)
        self.lo, self.data, self.hi = lo.SerializeToString(), True, hi.SerializeToString()

    def size(self) -> int:
        if self.data is None:
            return len(self.lo)
        return len(self.lo) + len(_key(_TENSOR_RAW_DATA)) + len(varint(self.nbytes)) + self.nbytes + len(self.hi)

    def write(self, f) -> None:
        f.write(self.lo)
        if self.data is None:
            return
        buf = tensor_buffer(self.tensor)
        if len(buf) != self.nbytes:
            raise ValueError(f"initializer {self.tensor.name}: {len(buf)} data bytes, expected {self.nbytes}")
        f.write(_key(_TENSOR_RAW_DATA) + varint(self.nbytes))
        f.write(buf)
        f.write(self.hi)

    def can_be_external(self) -> bool:
        return self.header is not None

    def external(self, location: str, offset: int) -> bytes:
        """The serialized TensorProto pointing into the external data file."""
        tp = onnx.TensorProto()
        tp.CopyFrom(self.header)
        tp.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(self.nbytes))):  # as onnx writes them
            e = tp.external_data.add()
            e.key, e.value = k, v
        return tp.SerializeToString()


def model_without_data(model: ir.Model) -> tuple[onnx.ModelProto, list]:
    """(the ModelProto with every initializer's data left out, the initializer tensors in file order)."""
    values = list(model.graph.initializers.values())
    real = [v.const_value for v in values]
    try:
        for v in values:
            if v.const_value is not None:
                v.const_value = ir.Tensor(np.zeros(0, np.uint8), name=v.name)
        proto = ir.to_proto(model)
    finally:
        for v, t in zip(values, real):
            v.const_value = t
    by_name = {v.name: t for v, t in zip(values, real)}
    tensors = [by_name[tp.name] for tp in proto.graph.initializer]
    del proto.graph.initializer[:]
    return proto, tensors


def write_model(model: ir.Model, path: str | os.PathLike, *, edit: Callable[[onnx.ModelProto], None] | None = None,
                limit: int = TWO_GB, external_threshold: int = 1024) -> bool:
    """Write `model` to `path` (not atomic: write into a temporary folder and move, as export.save does).
    `edit(proto)` may change the ModelProto (metadata, producer ...) before it is written; it sees no initializers.
    Returns True when the data went to `<name>.data` beside `path` (the file would have exceeded `limit`)."""
    proto, tensors = model_without_data(model)
    if edit is not None:
        edit(proto)
        if len(proto.graph.initializer):
            raise ValueError("edit() must not add initializers")
    for t, v in zip(tensors, model.graph.initializers.values()):
        t.name = v.name  # as ir.to_proto names them
    records = [_Record(t) for t in tensors]
    head, tail = _split(proto, _MODEL_GRAPH)
    g_lo, g_hi = _split(proto.graph, _GRAPH_INITIALIZER)
    head_b, tail_b, g_lo_b, g_hi_b = (m.SerializeToString() for m in (head, tail, g_lo, g_hi))
    path = Path(path)
    sizes = [r.size() for r in records]
    graph_len = len(g_lo_b) + sum(len(_key(_GRAPH_INITIALIZER)) + len(varint(n)) + n for n in sizes) + len(g_hi_b)
    total = len(head_b) + len(_key(_MODEL_GRAPH)) + len(varint(graph_len)) + graph_len + len(tail_b)
    external = total > limit
    if external:
        location = path.name + ".data"
        entries, offset = [], 0
        with open(path.parent / location, "wb") as d:
            for r in records:
                if r.can_be_external() and r.nbytes >= external_threshold:
                    entries.append(r.external(location, offset))
                    buf = tensor_buffer(r.tensor)
                    d.write(buf)
                    offset += len(buf)
                    del buf  # before the next tensor is made (a LazyTensor's bytes exist only while written)
                else:
                    entries.append(None)
        graph_len = len(g_lo_b) + len(g_hi_b) + sum(
            len(_key(_GRAPH_INITIALIZER)) + len(varint(len(e) if e is not None else s)) + (len(e) if e is not None else s)
            for e, s in zip(entries, sizes))
    with open(path, "wb") as f:
        f.write(head_b)
        f.write(_key(_MODEL_GRAPH) + varint(graph_len))
        f.write(g_lo_b)
        for i, (r, n) in enumerate(zip(records, sizes)):
            e = entries[i] if external else None
            if e is not None:
                f.write(_key(_GRAPH_INITIALIZER) + varint(len(e)) + e)
            else:
                f.write(_key(_GRAPH_INITIALIZER) + varint(n))
                r.write(f)
        f.write(g_hi_b)
        f.write(tail_b)
    return external


def save_model(model: ir.Model, path: str | os.PathLike, edit: Callable[[onnx.ModelProto], None] | None = None) -> None:
    """Atomic write of an onnx_ir model, initializer by initializer (`write_model`): the one rule for every .onnx
    this package writes (export, `check --fix`). A model whose file would exceed protobuf's 2 GB puts its data in
    `path` + `.data` beside it. `edit(proto)` changes the ModelProto (without initializers) first."""
    import shutil
    import tempfile

    from sq_export.fileio import check_output_path

    final = check_output_path(path)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp = tmpdir / final.name
        if write_model(model, tmp, edit=edit, limit=TWO_GB):
            os.replace(tmpdir / (final.name + ".data"), final.parent / (final.name + ".data"))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
