"""weights_fp16 (`export --weights qdq16`): constant float32 W -> QuantizeLinear -> DequantizeLinear  ==>
float16 W' -> Cast(to=FLOAT) -> QuantizeLinear -> DequantizeLinear, with W' = float16(q · scale), q the INT8 values
QuantizeLinear computes from W (ONNX semantics: round half to even of W / scale, saturated).

Why: TensorRT 8.6's Myelin refuses INT8 initializers feeding DequantizeLinear (the `--weights int8` form), so 8.6
gets float weights -> Q -> DQ, whose float32 weights make a 7B graph 27 GB. Half the bytes with the same INT8
values: the weight is stored already quantized, q · scale, rounded to float16. Re-quantizing it gives back q
exactly: |float16(q·s) − q·s| ≤ 2⁻¹¹·|q·s|, so |float16(q·s)/s − q| ≤ 127·2⁻¹¹ ≈ 0.062 < ½ — as long as q·s is a
normal float16 (|q·s| ≥ 2⁻¹⁴ when q ≠ 0; a subnormal rounds coarser) and below 65,504. When a weight's scales
guarantee both (every s ≥ 2⁻¹⁴ and 128·s ≤ 65,504, zero-point 0) the bound is a proof and W' is computed only when
the file is written (an `ir.LazyTensor`: a 7B graph's 13 GB of float16 weights are never all in memory at once);
otherwise the pass re-quantizes W' in float32, compares with q, and leaves a weight that would change in float32
(counted in `kept_float32`). Storing W itself in float16 instead would move INT8 values: W/s near a half-integer rounds
the other way once W is rounded (tests/test_export_qdq16.py measures how many).

QuantizeLinear at opsets 13–18 takes float32 input (float16 only from opset 19, which TensorRT 8.6 cannot parse),
hence the Cast. The graph computes exactly what the float32 Q/DQ graph computes (same INT8 values, same scales,
same DQ output): ONNX Runtime gives bit-identical logits. Whether TensorRT 8.6 folds Cast(constant) -> Q into its
INT8 weights at build time: it does (H200, 2026-11-29: identical logits to the float32 form, docs/BIG_MODELS.md).
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


FP16_MIN_NORMAL = 2.0**-14
FP16_MAX = 65504.0


def scales_guarantee_exact(scale: np.ndarray, zp: np.ndarray | None) -> bool:
    """True when every float16(q·s) is a normal float16 for these scales (s ≥ 2⁻¹⁴, so |q·s| ≥ 2⁻¹⁴ for q ≠ 0;
    128·s ≤ 65,504, so no overflow) and the zero-point is 0: then re-quantizing float16(q·s) gives q back by the
    bound in the module docstring, with no need to compute and compare."""
    s = np.asarray(scale, np.float64)
    if s.size == 0 or (zp is not None and np.any(np.asarray(zp) != 0)):
        return False
    return float(s.min()) >= FP16_MIN_NORMAL and 128.0 * float(s.max()) <= FP16_MAX


def fp16_weight(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int, *, verify: bool = True) -> np.ndarray | None:
    """float16(q · scale), or None when a value would re-quantize to another INT8 value (subnormal, overflow).
    verify=False: skip the re-quantization (for scales that `scales_guarantee_exact`)."""
    q = quantize_like_onnx(w, scale, zp, axis, np.int8)
    shape = [1] * w.ndim
    if scale.ndim:
        shape[axis % w.ndim] = -1
    s = np.asarray(scale, np.float32).reshape(shape) if scale.ndim else np.float32(scale)
    with np.errstate(over="ignore"):
        w16 = (q.astype(np.float32) * s).astype(np.float16)
    if not verify:
        return w16
    back = quantize_like_onnx(w16.astype(np.float32), scale, zp, axis, np.int8)
    return w16 if np.array_equal(back, q) else None


def _lazy_fp16(src, s: np.ndarray, zp, axis: int) -> ir.LazyTensor:
    """float16(q·s) computed when the tensor is read (written to the file), not kept afterwards. `src`: the float32
    weight's tensor (its values are read then: a model's tensor, or a weight still in the checkpoint)."""
    return ir.LazyTensor(lambda: ir.Tensor(fp16_weight(src.numpy(), s, zp, axis, verify=False)),
                         dtype=ir.DataType.FLOAT16, shape=ir.Shape(tuple(src.shape)))


def weights_graph(graph: ir.Graph) -> tuple[int, int]:
    done = kept = 0
    for q in nodes_of(graph, "QuantizeLinear"):
        w = q.inputs[0]
        users = q.outputs[0].consumers()
        if not users or any(u.op_type != "DequantizeLinear" for u in users) or q.outputs[0].is_graph_output():
            continue
        src = w.const_value if w is not None and w.producer() is None else None  # the tensor, not read yet
        s = _initializer_array(q.inputs[1]) if len(q.inputs) > 1 else None
        zp_v = q.inputs[2] if len(q.inputs) > 2 else None
        zp = _initializer_array(zp_v) if zp_v is not None else None
        if (src is None or s is None or src.dtype != ir.DataType.FLOAT or len(src.shape) < 2
                or (zp is not None and zp.dtype != np.int8)):
            continue  # activations; already converted
        axis = attr_int(q, "axis", 1)
        if scales_guarantee_exact(s, zp):
            w16 = _lazy_fp16(src, s, zp, axis)
        else:
            w16 = fp16_weight(src.numpy(), s, zp, axis)
            if w16 is None:
                kept += 1
                continue
        q.replace_input_with(0, widened_fp16(graph, w, w16, before=q))
        drop_if_unused(graph, w)
        done += 1
    return done, kept


def widened_fp16(graph: ir.Graph, w: ir.Value, tensor16, *, before: ir.Node) -> ir.Value:
    """A float16 initializer holding `tensor16` (weight `w`'s values in float16) and a Cast(to=FLOAT) of it inserted
    before node `before`: the float32 value that takes `w`'s place (the caller rewires the uses)."""
    v16 = add_initializer(graph, f"{w.name or 'weight'}.fp16", tensor16)
    out = ir.val(unique_name(graph, f"{w.name or 'weight'}.fp32"), ir.DataType.FLOAT, v16.shape)
    cast = ir.node("Cast", [v16], attributes={"to": FLOAT}, outputs=[out], name=unique_name(graph, f"{w.name or 'weight'}.cast"))
    graph.insert_before(before, cast)
    return out


class WeightsToFp16Pass(ir.passes.InPlacePass):
    """`count` weights stored in float16 -> Cast, `kept_float32` left in float32 by `graph_pass` (graph -> (done,
    kept)): this module's Q/DQ weights, or passes/float_weights_fp16.py's float graph weights."""

    graph_pass = staticmethod(weights_graph)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.kept_float32 = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count, self.kept_float32 = self.graph_pass(model.graph)
        return ir.passes.PassResult(model, modified=self.count > 0)
