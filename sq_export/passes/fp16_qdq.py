"""fp16_qdq (`export --dtype fp16`): float16 Q/DQ, opset 19.

The float16 export traces a float16 model whose QLinears fake-quantize in float32 between Casts (float32 scales:
torch's symbolic always casts them), so the raw graph reads

    x16 -> Cast(FLOAT) -> QuantizeLinear(s32) -> DequantizeLinear(s32) -> Cast(FLOAT16) -> MatMul
    W   -> [QuantizeLinear(s32) ->] DequantizeLinear(s32) -> Cast(FLOAT16) -> MatMul

This pass removes those Casts and gives every QuantizeLinear/DequantizeLinear a float16 scale, so Q reads the
float16 activation and DQ returns float16 (ONNX opset 19 allows float16 x/scale; opset 13-18 do not):

    x16 -> QuantizeLinear(s16) -> DequantizeLinear(s16) -> MatMul,   W8 -> DequantizeLinear(s16) -> MatMul

which is what TensorRT 10+ strongly typed networks want (the scale's type is DQ's output type; a Cast between DQ
and MatMul would sit in the way of its Q/DQ fusion) and ONNX Runtime runs on CPU. Float weights in front of a Q
(`--weights qdq`) become float16. Numerically: the scale values are rounded to float16 (at least 2**-24, the
smallest float16 subnormal); export_onnx rounds the QLinears' weight scales the same way before the INT8 weights
are computed, so every DQ reproduces the fake quantization's weight grid exactly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_export.passes._graph import add_initializer, attr_int, const_array, drop_if_unused, is_const, label, nodes_of

MIN_OPSET = 19
FP16_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal)


def fp16_scale(s: np.ndarray) -> np.ndarray:
    """float16 values of scales (float32 in), at least FP16_MIN_SCALE; ValueError where float16 overflows."""
    s16 = np.maximum(np.asarray(s, np.float32).astype(np.float16), np.float16(FP16_MIN_SCALE))
    if not np.all(np.isfinite(s16)):
        raise ValueError(f"a Q/DQ scale ({float(np.max(s)):.4g}) overflows float16")
    return s16


def _is_cast_to(node: ir.Node | None, dtype: ir.DataType) -> bool:
    return node is not None and node.op_type == "Cast" and node.domain == "" and attr_int(node, "to", 0) == dtype.value


def _drop_node_if_unused(graph: ir.Graph, node: ir.Node | None) -> None:
    if node is not None and node.graph is graph and not any(o.uses() or o.is_graph_output() for o in node.outputs):
        graph.remove(node, safe=True)


def fp16_graph(graph: ir.Graph) -> int:
    """Rewrite every Q/DQ of `graph` to float16 as described above. Returns the number of Q/DQ nodes changed."""
    new_scales: dict[int, ir.Value] = {}
    new_weights: dict[int, ir.Value] = {}
    count = 0
    for node in [n for n in graph if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain == ""]:
        old = node.inputs[1]
        if id(old) not in new_scales:
            s = const_array(old)
            if s is None:
                raise ValueError(f"{label(node)}: scale is not a constant")
            if s.dtype == np.float16:
                new_scales[id(old)] = old
            else:
                new_scales[id(old)] = add_initializer(graph, f"{old.name or label(node)}.f16", fp16_scale(s))
        node.replace_input_with(1, new_scales[id(old)])
        drop_if_unused(graph, old)
        if node.op_type == "QuantizeLinear":
            x = node.inputs[0]
            p = x.producer()
            if _is_cast_to(p, ir.DataType.FLOAT):  # x16 -> Cast(FLOAT) -> Q  ==>  x16 -> Q
                node.replace_input_with(0, p.inputs[0])
                _drop_node_if_unused(graph, p)
            elif is_const(x):  # a float weight (--weights qdq)
                w = const_array(x)
                if w.dtype == np.float32:
                    if id(x) not in new_weights:
                        new_weights[id(x)] = add_initializer(graph, f"{x.name}.f16", w.astype(np.float16))
                    node.replace_input_with(0, new_weights[id(x)])
                    drop_if_unused(graph, x)
        else:
            out = node.outputs[0]
            for c in list(out.consumers()):
                if _is_cast_to(c, ir.DataType.FLOAT16):  # DQ -> Cast(FLOAT16) -> y  ==>  DQ -> y
                    if c.outputs[0].is_graph_output():
                        raise ValueError(f"{label(c)}: a Q/DQ output is a graph output")
                    c.outputs[0].replace_all_uses_with(out)
                    graph.remove(c, safe=True)
            rest = [c for c in out.consumers() if c.op_type != "QuantizeLinear"]
            if any(_is_cast_to(c, ir.DataType.FLOAT) for c in rest):
                raise ValueError(f"{label(node)}: DequantizeLinear output read as float32")
            out.type = ir.TensorType(ir.DataType.FLOAT16)
        count += 1
    return count


class Float16QDQPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < MIN_OPSET:
            raise ir.passes.PreconditionError(f"float16 Q/DQ need opset >= {MIN_OPSET} (the graph has "
                                              f"{model.opset_imports.get('', 0)})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count = fp16_graph(model.graph)
        return ir.passes.PassResult(model, modified=self.count > 0)

    def ensures(self, model: ir.Model) -> None:
        for node in nodes_of(model.graph, "QuantizeLinear") + nodes_of(model.graph, "DequantizeLinear"):
            s = const_array(node.inputs[1])
            if s is None or s.dtype != np.float16:
                raise ir.passes.PostconditionError(f"{label(node)}: scale not float16")
            if node.op_type == "QuantizeLinear" and _is_cast_to(node.inputs[0].producer(), ir.DataType.FLOAT):
                raise ir.passes.PostconditionError(f"{label(node)}: still reads a float32 Cast")
