"""ort_uint8 (`--target ort`): activation Q/DQ int8 zp 0  ==>  uint8 zp 128, same scale; weights stay int8.

Numerically identical: clip(round(x/s), -128, 127) + 128 == clip(round(x/s) + 128, 0, 255), and DQ subtracts the
128 again. Why: ONNX Runtime's CPU QDQ fusions want uint8 activations. Measured with onnxruntime 1.32 (CPU EP,
ORT_ENABLE_ALL, optimized_model_filepath; see tests/test_passes_ort_uint8.py::test_ort_fuses_uint8):
  * int8 activations: ORT inserts its own s8->u8 conversion and fuses some Linears to
    com.microsoft.MatMulIntegerToFloat, but not MatMuls whose activation DQ is shared (q/k/v after one norm:
    those stay DQ -> float MatMul);
  * uint8 activations (this pass): every Linear MatMul with a per-channel int8 weight DQ (axis=1, [K, N]) becomes
    MatMulIntegerToFloat, Q.K^T becomes MatMulIntegerToFloat, P.V QLinearMatMul; only the float lm_head stays
    MatMul.
  * Gemm(transB=1) with a float bias input C is NOT fused in either form (DQ -> Gemm stays float). ORT fuses
    DQ/DQ -> Gemm into com.microsoft.QGemm only without C (or with an int32 bias through its own DQ); so for ORT
    speed export Linears as MatMul (+ Add bias), or Gemm without C followed by Add.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_export.passes._graph import add_initializer, const_array, drop_if_unused, is_const, nodes_of


def uint8_graph(graph: ir.Graph) -> int:
    zp128: ir.Value | None = None
    count = 0
    for q in nodes_of(graph, "QuantizeLinear"):
        if is_const(q.inputs[0]) or len(q.inputs) < 3 or q.inputs[2] is None:
            continue
        zp = const_array(q.inputs[2])
        s = const_array(q.inputs[1])
        if zp is None or s is None or zp.dtype != np.int8 or zp.size != 1 or np.any(zp != 0) or s.size != 1:
            continue
        users = q.outputs[0].consumers()
        if any(u.op_type != "DequantizeLinear" or len(u.inputs) < 3 or u.inputs[2] is None for u in users):
            continue  # dangling / mismatched pairs are lint_qdq's business; leave them as they are
        if zp128 is None:
            zp128 = add_initializer(graph, "sq_export.act_zero_point_u8", np.array(128, np.uint8))
        old = {id(q.inputs[2]): q.inputs[2]}
        q.replace_input_with(2, zp128)
        for dq in users:
            old[id(dq.inputs[2])] = dq.inputs[2]
            dq.replace_input_with(2, zp128)
        for v in old.values():
            drop_if_unused(graph, v)
        count += 1
    return count


class ActivationsToUint8Pass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count = uint8_graph(model.graph)
        return ir.passes.PassResult(model, modified=self.count > 0)
