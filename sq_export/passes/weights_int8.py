"""weights_int8: constant float W -> QuantizeLinear -> DequantizeLinear  ==>  int8 initializer -> DequantizeLinear.

The int8 values are computed with numpy exactly as ONNX QuantizeLinear defines them:
    saturate(round_half_to_even(W / scale) + zero_point)   (float32 division, [-128, 127] for int8)
so the graph computes bit-identical outputs. The TensorRT 10+ form; TensorRT 8.6 wants the Q/DQ form.
The float initializer is dropped when nothing else reads it (tied embeddings keep theirs).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_export.passes._graph import add_initializer, attr_int, const_array, drop_if_unused, is_const, nodes_of

_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def quantize_like_onnx(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int = 1,
                       dtype=np.int8) -> np.ndarray:
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    zp = np.zeros((), dtype) if zp is None else np.asarray(zp)
    if scale.size > 1 or scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.size > 1 or zp.ndim == 1 else zp
    lo, hi = _RANGES[np.dtype(zp.dtype)]
    # in place on one float32 temporary (the same operations, so the same values): four weight-sized temporaries
    # per weight, freed between the small INT8 results that stay, fragmented the heap during export
    y = np.asarray(np.divide(x, scale, dtype=np.float32))  # (a 0-d input gives a scalar: made an array)
    np.rint(y, out=y)
    y += zp.astype(np.float32)
    np.clip(y, lo, hi, out=y)
    return y.astype(zp.dtype)


def _lazy_int8(src, s, zp, axis: int):
    dtype = np.dtype(zp.dtype)
    return ir.LazyTensor(lambda: ir.Tensor(quantize_like_onnx(src.numpy(), s, zp, axis, dtype)),
                         dtype=ir.DataType.INT8 if dtype == np.int8 else ir.DataType.UINT8, shape=src.shape)


def weights_graph(graph: ir.Graph) -> int:
    count = 0
    for q in nodes_of(graph, "QuantizeLinear"):
        w = q.inputs[0]
        users = q.outputs[0].consumers()
        if not is_const(w) or not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        if q.outputs[0].is_graph_output():
            continue
        zp_v = q.inputs[2] if len(q.inputs) > 2 else None
        s = const_array(q.inputs[1])
        zp = const_array(zp_v) if zp_v is not None else np.zeros((), np.uint8)
        # a weight read from the checkpoint when written (stream/lazy.py) is quantized then too, without reading it now
        lazy = w.const_value if isinstance(w.const_value, ir.LazyTensor) else None
        x = None if lazy is not None else const_array(w)
        is_float = lazy.dtype == ir.DataType.FLOAT if lazy is not None else x is not None and x.dtype == np.float32
        if not is_float or s is None or zp is None or np.dtype(zp.dtype) not in _RANGES:
            continue
        axis = attr_int(q, "axis", 1)
        wq = _lazy_int8(lazy, s, zp, axis) if lazy is not None else quantize_like_onnx(x, s, zp, axis, zp.dtype)
        qv = add_initializer(graph, f"{w.name or 'weight'}.int8" if zp.dtype == np.int8 else f"{w.name}.uint8", wq)
        for dq in users:
            dq.replace_input_with(0, qv)
        graph.remove(q, safe=True)
        drop_if_unused(graph, w)
        count += 1
    return count


class WeightsToInt8Pass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count = weights_graph(model.graph)
        return ir.passes.PassResult(model, modified=self.count > 0)

    def ensures(self, model: ir.Model) -> None:
        for q in nodes_of(model.graph, "QuantizeLinear"):
            if is_const(q.inputs[0]) and const_array(q.inputs[0]).dtype == np.float32:
                users = q.outputs[0].consumers()
                if users and all(u.op_type == "DequantizeLinear" for u in users) and \
                        not q.outputs[0].is_graph_output():
                    raise ir.passes.PostconditionError(f"weight QuantizeLinear {q.name} left in place")
