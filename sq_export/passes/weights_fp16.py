"""weights_fp16 (`export --weights qdq16`): constant float32 W -> QuantizeLinear -> DequantizeLinear  ==>
float16 W' -> Cast(to=FLOAT) -> QuantizeLinear -> DequantizeLinear, with W' = float16(q · scale), q the INT8 values
QuantizeLinear computes from W (ONNX semantics: round half to even of W / scale, saturated).

Why: TensorRT 8.6's Myelin refuses INT8 initializers feeding DequantizeLinear (the `--weights int8` form), so 8.6
gets float weights -> Q -> DQ, whose float32 weights make a 7B graph 27 GB. Half the bytes with the same INT8
values: the weight is stored already quantized, q · scale, rounded to float16. Re-quantizing it gives back q
exactly: |float16(q·s) − q·s| ≤ 2⁻¹¹·|q·s|, so |float16(q·s)/s − q| ≤ 127·2⁻¹¹ ≈ 0.062 < ½ — as long as q·s is a
normal float16 (|q·s| ≥ 2⁻¹⁴ when q ≠ 0; a subnormal rounds coarser) and below 65,504. The pass checks every
weight (re-quantizes W' in float32 and compares with q) and leaves a weight that would change in float32 (counted
in `kept_float32`). Storing W itself in float16 instead would move INT8 values: W/s near a half-integer rounds
the other way once W is rounded (tests/test_export_qdq16.py measures how many).

QuantizeLinear at opsets 13–18 takes float32 input (float16 only from opset 19, which TensorRT 8.6 cannot parse),
hence the Cast. The graph computes exactly what the float32 Q/DQ graph computes (same INT8 values, same scales,
same DQ output): ONNX Runtime gives bit-identical logits. Whether TensorRT 8.6 folds Cast(constant) -> Q into its
INT8 weights at build time is to be verified on the device (docs/TENSORRT.md).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_export.passes._graph import add_initializer, attr_int, drop_if_unused, nodes_of, unique_name
from sq_export.passes.weights_int8 import quantize_like_onnx

FLOAT = 1  # onnx.TensorProto.FLOAT


def _initializer_array(value: ir.Value) -> np.ndarray | None:
    if value is None or value.const_value is None or value.producer() is not None:
        return None
    return value.const_value.numpy()


def fp16_weight(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray | None:
    """float16(q · scale), or None when a value would re-quantize to another INT8 value (subnormal, overflow)."""
    q = quantize_like_onnx(w, scale, zp, axis, np.int8)
    shape = [1] * w.ndim
    if scale.ndim:
        shape[axis % w.ndim] = -1
    s = np.asarray(scale, np.float32).reshape(shape) if scale.ndim else np.float32(scale)
    with np.errstate(over="ignore"):
        w16 = (q.astype(np.float32) * s).astype(np.float16)
    back = quantize_like_onnx(w16.astype(np.float32), scale, zp, axis, np.int8)
    return w16 if np.array_equal(back, q) else None


def weights_graph(graph: ir.Graph) -> tuple[int, int]:
    done = kept = 0
    for q in nodes_of(graph, "QuantizeLinear"):
        w = q.inputs[0]
        users = q.outputs[0].consumers()
        if not users or any(u.op_type != "DequantizeLinear" for u in users) or q.outputs[0].is_graph_output():
            continue
        x = _initializer_array(w)
        s = _initializer_array(q.inputs[1]) if len(q.inputs) > 1 else None
        zp_v = q.inputs[2] if len(q.inputs) > 2 else None
        zp = _initializer_array(zp_v) if zp_v is not None else None
        if x is None or s is None or x.dtype != np.float32 or x.ndim < 2 or (zp is not None and zp.dtype != np.int8):
            continue  # activations; already converted
        w16 = fp16_weight(x, s, zp, attr_int(q, "axis", 1))
        if w16 is None:
            kept += 1
            continue
        v16 = add_initializer(graph, f"{w.name or 'weight'}.fp16", w16)
        out = ir.val(unique_name(graph, f"{w.name or 'weight'}.fp32"), ir.DataType.FLOAT, v16.shape)
        cast = ir.node("Cast", [v16], attributes={"to": FLOAT}, outputs=[out], name=unique_name(graph, f"{w.name or 'weight'}.cast"))
        graph.insert_before(q, cast)
        q.replace_input_with(0, out)
        drop_if_unused(graph, w)
        done += 1
    return done, kept


class WeightsToFp16Pass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.kept_float32 = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count, self.kept_float32 = weights_graph(model.graph)
        return ir.passes.PassResult(model, modified=self.count > 0)
