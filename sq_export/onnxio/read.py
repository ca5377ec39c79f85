"""Read an .onnx file without reading its weights (torch-free: numpy, onnx, onnx-ir).

`onnx.load` and `ir.load` parse every initializer's raw bytes into memory (and onnx.load holds the file's bytes
too while it parses): 2 × 335 MB for a SmolLM2 INT8 graph, 2 × 650 MB for the FP32 one. `read_skeleton` walks the
protobuf wire format of the file instead (mmap, nothing copied but the fields it keeps) and returns the ModelProto
with each initializer's raw_data left out, plus where each one's bytes sit in the file. From that:

- `load_lazy(path)`: an onnx_ir model whose initializers are views into one read-only map of the file, read on
  demand: a pass that reads a constant (a scale, a zero point, a norm weight) touches just those bytes; the
  weights are never read;
- `checker_message(path)`: onnx.checker on the skeleton written as a small file beside the input, whose
  initializers point into the input file as external data (the checker then checks them as it checks external
  data: that the file exists; `read_skeleton` itself has checked each raw_data's length against its shape).

Files that this reader does not take (external data of their own, a raw_data length that does not match its
shape, anything that does not parse) make it return None; callers then read the file the ordinary way, so
messages about broken files are unchanged.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from pathlib import Path

import onnx

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_DATA_LOCATION = 14

# bytes per element of the types whose raw_data is fixed-size (others: the reader declines the file)
_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT16: 2,
             onnx.TensorProto.INT16: 2, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1,
             onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.UINT32: 4, onnx.TensorProto.UINT64: 8,
             onnx.TensorProto.BFLOAT16: 2}


class _Declined(Exception):
    pass


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= end or shift > 63:
            raise _Declined("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of the field's key, start of its payload, end of the field) per field."""
    i = start
    while i < end:
        key_at = i
        key, i = _varint(buf, i, end)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, j = _varint(buf, i, end)
        elif wt == 1:
            j = i + 8
        elif wt == 5:
            j = i + 4
        elif wt == 2:
            n, i = _varint(buf, i, end)
            j = i + n
        else:  # groups: not in ONNX
            raise _Declined(f"wire type {wt}")
        if j > end or num == 0:
            raise _Declined("truncated field")
        yield num, wt, key_at, i, j
        i = j


def read_skeleton(path: str | os.PathLike) -> tuple[onnx.ModelProto, list[tuple[int, int]]] | None:
    """(the ModelProto without the initializers' raw_data, [(offset, length) of each initializer's raw_data in the
    file, in initializer order]) or None when the file is not one this reader takes (see the module doc)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return None
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _skeleton(buf, size)
        finally:
            buf.close()
    except Exception:  # _Declined, OSError, protobuf's DecodeError ...: the ordinary reader reports it
        return None


def _skeleton(buf, size: int):
    model = onnx.ModelProto()
    graph = onnx.GraphProto()
    spans: list[tuple[int, int]] = []
    n_graph = 0
    for num, wt, key_at, start, end in _fields(buf, 0, size):
        if num == _MODEL_GRAPH and wt == 2:
            n_graph += 1
            for gnum, gwt, gkey, gstart, gend in _fields(buf, start, end):
                if gnum == _GRAPH_INITIALIZER and gwt == 2:
                    graph.initializer.append(_tensor(buf, gstart, gend, spans))
                else:
                    graph.MergeFromString(bytes(buf[gkey:gend]))
        else:
            model.MergeFromString(bytes(buf[key_at:end]))
    if n_graph != 1:
        raise _Declined("not one graph")
    model.graph.CopyFrom(graph)
    return model, spans


def _tensor(buf, start: int, end: int, spans: list) -> onnx.TensorProto:
    t = onnx.TensorProto()
    raw = None
    for num, wt, key_at, s, e in _fields(buf, start, end):
        if num == _TENSOR_RAW_DATA and wt == 2:
            raw = (s, e - s)
        else:
            t.MergeFromString(bytes(buf[key_at:e]))
    if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data:
        raise _Declined("external data")
    if raw is None:
        raise _Declined("initializer without raw_data")  # typed fields (float_data ...): rare, read it normally
    item = _ITEMSIZE.get(t.data_type)
    n = 1
    for d in t.dims:
        n *= int(d)
    if item is None or n * item != raw[1]:
        raise _Declined(f"raw_data of {t.name} is {raw[1]} bytes for {n} elements")
    spans.append(raw)
    return t


def point_into(model: onnx.ModelProto, spans, location: str) -> None:
    """Make each initializer of a `read_skeleton` model external data at its span of the file `location`."""
    for t, (offset, length) in zip(model.graph.initializer, spans):
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v


def load_lazy(path: str | os.PathLike):
    """An onnx_ir model of `path` whose initializers read their bytes from the file only when asked (None: the
    file is not one this reader takes; load it with ir.load). The initializers are onnx_ir LazyTensors over one
    read-only map of the file (numpy views, no copies), alive as long as the model."""
    import numpy as np
    import onnx_ir as ir

    path = Path(path)
    got = read_skeleton(path)
    if got is None:
        return None
    proto, spans = got
    model = ir.serde.deserialize_model(proto)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    by_name = {t.name: span for t, span in zip(proto.graph.initializer, spans)}
    del proto
    for name, v in model.graph.initializers.items():
        t = v.const_value
        offset, length = by_name[name]

        def read(offset=offset, length=length, dtype=t.dtype, shape=tuple(t.shape.numpy()), name=name):
            arr = np.frombuffer(buf, dtype=np.dtype(dtype.numpy()).newbyteorder("<"), count=length // int(dtype.itemsize), offset=offset)
            return ir.Tensor(arr.reshape(shape), dtype=dtype, name=name)

        v.const_value = ir.LazyTensor(read, dtype=t.dtype, shape=t.shape, name=name)
    return model


@contextlib.contextmanager
def skeleton_beside(path: str | os.PathLike, suffix: str):
    """A small hidden temporary .onnx beside `path` whose initializers point into `path` as external data (read
    lazily by whoever opens it), deleted on exit; None where `read_skeleton` declines the file or its folder takes
    no temporary file (then use the file itself)."""
    path = Path(path).resolve()
    got = read_skeleton(path)
    if got is None:
        yield None
        return
    proto, spans = got
    point_into(proto, spans, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError:
        yield None
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        del proto, got
        yield tmp
    finally:
        os.unlink(tmp)


def checker_message(path: str | os.PathLike) -> tuple[bool, str | None]:
    """(whether the lazy check ran, onnx.checker's first error line or None). It declines (False, None) where
    `read_skeleton` does or the input's folder takes no temporary file; then check the file itself."""
    with skeleton_beside(path, ".check.onnx") as tmp:
        if tmp is None:
            return False, None
        try:
            onnx.checker.check_model(tmp)
        except Exception as e:  # ValidationError and friends
            msg = str(e).strip().splitlines()
            return True, msg[0] if msg else type(e).__name__
        return True, None


# ----- the loaders the rest of the package uses --------------------------------------------------------------------
def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """The onnx.ModelProto of `path` without its external weights (internal weights included, as TensorRT's parser
    needs them); BadInput when unreadable or empty. The engine side builds from it."""
    from sq_export.errors import BadInput

    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise BadInput(f"ONNX file {path} does not exist") from None
    except IsADirectoryError:
        raise BadInput(f"{path} is a folder, not an ONNX file") from None
    except PermissionError:
        raise BadInput(f"ONNX file {path} is not readable (permission denied)") from None
    except Exception as e:
        raise BadInput(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    if len(model.graph.node) == 0:
        raise BadInput(f"{path} holds no ONNX graph (empty or not an ONNX file)")
    return model


def load_graph_only(path: str | os.PathLike) -> onnx.ModelProto:
    """The ModelProto of `path` with no initializer data at all (`read_skeleton`; `load_proto` where it declines):
    for reading metadata, names and shapes of a graph of any size."""
    got = read_skeleton(Path(path)) if Path(path).is_file() else None
    return got[0] if got is not None else load_proto(path)


def load_ir(path_or_model) -> tuple:
    """An onnx_ir model of a path (weights read lazily, `load_lazy`), ModelProto or IR model, with a display name;
    BadInput for anything that is not a readable ONNX model."""
    import onnx_ir as ir

    from sq_export.errors import BadInput

    if isinstance(path_or_model, ir.Model):
        return path_or_model, path_or_model.graph.name or "<model>"
    if isinstance(path_or_model, onnx.ModelProto):
        try:
            model = ir.from_proto(path_or_model)
        except Exception as e:
            raise BadInput(f"<model>: not a valid ONNX model ({type(e).__name__}: {e})") from e
        return validated(model, "<model>"), "<model>"
    path = Path(path_or_model)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a folder, expected an .onnx file")
    if not os.access(path, os.R_OK):
        raise BadInput(f"{path}: not readable (permissions)")
    try:
        # weights are not read: only the constants the passes look at are, on demand (sq_export.onnxio.read);
        # a file that reader declines is loaded whole, as before
        model = load_lazy(path) or ir.load(path)
    except Exception as e:  # DecodeError, truncated protobuf, missing external data ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"{path}: not a readable ONNX model ({msg}); is it truncated or another format?") from e
    return validated(model, str(path)), str(path)


def validated(model, name: str):
    from sq_export.errors import BadInput

    if not model.opset_imports or len(model.graph) == 0 or not model.graph.outputs:
        raise BadInput(f"{name}: not an ONNX model (no opset, nodes or outputs); is it truncated or another format?")
    return model
