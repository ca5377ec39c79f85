"""lint_qdq: Q/DQ placement rules TensorRT needs for explicit INT8 (and the exporter's own contract).

Rule ids (declared below, sq_export.passes.registry): QDQ001 one-sided DQ on a MatMul/Gemm; QDQ002 activation scale; QDQ003 weight scale;
QDQ004 weight scale axis/length; QDQ005 zero-point not zero; QDQ006 zero-point not int8; QDQ007 Q/DQ pair mismatch;
QDQ008 dangling Q; QDQ009 dangling DQ; QDQ010 duplicate Q of one tensor; QDQ011 Q/DQ on a graph output;
QDQ012 decomposed LayerNorm.

target="ort" additionally accepts activation zero-points of uint8 128 (the ort_uint8 form); weights stay int8 0.
A MatMul/Gemm without any DQ input is an intentional float layer (lm_head, FP16 fallback) and is not reported.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from sq_export.passes.registry import graph_check
from sq_export.passes._graph import (
    Violation,
    attr_int,
    const_array,
    const_shape,
    decomposed_layernorms,
    graph_output_producers,
    is_const,
    label,
    nodes_of,
)

_FLOATS = (np.float32, np.float16)


def _dq_source(value: ir.Value | None) -> tuple[ir.Node | None, list[int] | None]:
    """The DQ feeding `value` directly or through one Transpose: (DQ node, perm or None)."""
    p = value.producer() if value is not None else None
    if p is not None and p.op_type == "Transpose":
        perm = p.attributes.get("perm")
        q = p.inputs[0].producer() if p.inputs[0] is not None else None
        if q is not None and q.op_type == "DequantizeLinear":
            return q, (list(perm.value) if perm is not None else None)
        return None, None
    if p is not None and p.op_type == "DequantizeLinear":
        return p, None
    return None, None


def is_weight_dq(dq: ir.Node) -> bool:
    x = dq.inputs[0]
    if is_const(x):
        return True
    p = x.producer() if x is not None else None
    return p is not None and p.op_type == "QuantizeLinear" and is_const(p.inputs[0])


def _weight_value(dq: ir.Node) -> ir.Value:
    x = dq.inputs[0]
    p = x.producer()
    return p.inputs[0] if p is not None and p.op_type == "QuantizeLinear" else x


def _check_zp(node: ir.Node, weight: bool, target: str, out: list[Violation]) -> None:
    zp_v = node.inputs[2] if len(node.inputs) > 2 else None
    who = "weight" if weight else "activation"
    if zp_v is None:
        if node.op_type == "QuantizeLinear":
            out.append(Violation("QDQ006", label(node), "QuantizeLinear without zero-point quantizes to uint8: "
                                 "give an int8 zero-point 0"))
        return
    zp = const_array(zp_v)
    if zp is None:
        out.append(Violation("QDQ006", label(node), f"{who} zero-point is not a constant"))
        return
    if zp.dtype == np.uint8 and target == "ort" and not weight:
        if np.any(zp != 128):
            out.append(Violation("QDQ005", label(node), f"uint8 activation zero-point must be 128 (got "
                                 f"{zp.reshape(-1)[:4].tolist()})"))
        return
    if zp.dtype != np.int8:
        out.append(Violation("QDQ006", label(node), f"{who} zero-point is {zp.dtype}, TensorRT needs int8"))
        return
    if np.any(zp != 0):
        out.append(Violation("QDQ005", label(node), f"{who} zero-point not all zero (symmetric INT8 needed): "
                             f"{zp.reshape(-1)[:4].tolist()}"))


def _check_scale(node: ir.Node, weight: bool, out: list[Violation]) -> np.ndarray | None:
    s = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    rule = "QDQ003" if weight else "QDQ002"
    who = "weight" if weight else "activation"
    if s is None:
        out.append(Violation(rule, label(node), f"{who} scale is not a constant initializer"))
        return None
    if s.dtype not in _FLOATS:
        out.append(Violation(rule, label(node), f"{who} scale has dtype {s.dtype}, expected float32"))
        return s
    if not weight and s.size != 1:
        out.append(Violation(rule, label(node), f"activation scale must be a per-tensor scalar, got shape "
                             f"{list(s.shape)}"))
    bad = ~np.isfinite(s) | (s <= 0)
    if np.any(bad):
        out.append(Violation(rule, label(node), f"{who} scale must be positive and finite; "
                             f"{int(bad.sum())} of {s.size} values are not (e.g. {s.reshape(-1)[bad.reshape(-1)][0]})"))
    return s


def _same(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is b:
        return True
    x, y = const_array(a), const_array(b)
    return x is not None and y is not None and x.dtype == y.dtype and x.shape == y.shape and np.array_equal(
        x, y, equal_nan=x.dtype.kind == "f")


@graph_check("lint_qdq", {
    'QDQ001': 'quantized MatMul/Gemm with DequantizeLinear on only one input',
    'QDQ002': 'activation scale not a positive finite scalar constant',
    'QDQ003': 'weight scale not positive finite constant',
    'QDQ004': 'weight scale not per-channel of length N on the output-channel axis',
    'QDQ005': 'zero-point not all zero',
    'QDQ006': 'zero-point type not int8 (or missing: QuantizeLinear then defaults to uint8)',
    'QDQ007': 'QuantizeLinear and its DequantizeLinear use different scale, zero-point or axis',
    'QDQ008': 'dangling QuantizeLinear (not followed by DequantizeLinear only)',
    'QDQ009': 'dangling DequantizeLinear (no consumer, or activation DQ not fed by a QuantizeLinear)',
    'QDQ010': 'the same tensor is quantized by more than one QuantizeLinear',
    'QDQ011': 'Q/DQ on a graph output',
    'QDQ012': 'decomposed LayerNorm (ReduceMean -> Sub -> Pow -> ReduceMean ...): export LayerNormalization',
}, order=20)
def lint_graph(graph: ir.Graph, target: str = "trt") -> list[Violation]:
    out: list[Violation] = []
    qs, dqs = nodes_of(graph, "QuantizeLinear"), nodes_of(graph, "DequantizeLinear")

    by_input: dict[int, list[ir.Node]] = defaultdict(list)
    for q in qs:
        x = q.inputs[0]
        weight = is_const(x)
        _check_scale(q, weight, out)
        _check_zp(q, weight, target, out)
        by_input[id(x)].append(q)
        users = q.outputs[0].consumers()
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            others = sorted({u.op_type for u in users if u.op_type != "DequantizeLinear"})
            out.append(Violation("QDQ008", label(q), "QuantizeLinear output " +
                                 ("is not used" if not users else f"feeds {', '.join(others)}, not only "
                                  "DequantizeLinear")))
        for dq in users:
            if dq.op_type != "DequantizeLinear":
                continue
            zq = q.inputs[2] if len(q.inputs) > 2 else None
            zd = dq.inputs[2] if len(dq.inputs) > 2 else None
            if not _same(q.inputs[1], dq.inputs[1]) or not _same(zq, zd) or \
                    attr_int(q, "axis", 1) != attr_int(dq, "axis", 1):
                out.append(Violation("QDQ007", label(dq), f"scale/zero-point/axis differ from its QuantizeLinear "
                                     f"{label(q)}"))
    for group in by_input.values():
        for q in group[1:]:
            out.append(Violation("QDQ010", label(q), f"tensor {q.inputs[0].name!r} is already quantized by "
                                 f"{label(group[0])}: share one Q/DQ pair"))

    for dq in dqs:
        x = dq.inputs[0]
        p = x.producer() if x is not None else None
        if p is None or p.op_type != "QuantizeLinear":
            if is_const(x):  # int8 weight form: int8 initializer -> DQ
                _check_scale(dq, True, out)
                _check_zp(dq, True, target, out)
            else:
                out.append(Violation("QDQ009", label(dq), "DequantizeLinear of an activation that no "
                                     "QuantizeLinear produced"))
        if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
            out.append(Violation("QDQ009", label(dq), "DequantizeLinear output is not used"))

    for mm in [n for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]:
        (a_dq, _), (b_dq, b_perm) = _dq_source(mm.inputs[0]), _dq_source(mm.inputs[1])
        if (a_dq is None) != (b_dq is None):
            side, other = ("A", "B") if a_dq is not None else ("B", "A")
            out.append(Violation("QDQ001", label(mm), f"{mm.op_type} has DequantizeLinear on input {side} only: "
                                 f"quantize input {other} too, or neither (float layer)"))
            continue
        if b_dq is None or not is_weight_dq(b_dq):
            continue
        wshape = const_shape(_weight_value(b_dq))
        if wshape is None or len(wshape) != 2:
            continue
        axis = attr_int(b_dq, "axis", 1) % 2
        if b_perm is not None:  # DQ -> Transpose -> MatMul: the DQ axis lands at position perm.index(axis)
            axis = b_perm.index(axis) if axis in b_perm else axis
            wshape = tuple(wshape[i] for i in b_perm)
        n_axis = (0 if attr_int(mm, "transB", 0) else 1) if mm.op_type == "Gemm" else 1
        n = wshape[n_axis]
        s = const_array(b_dq.inputs[1])
        if s is None:
            continue
        if s.size == 1 and n > 1:
            out.append(Violation("QDQ004", label(b_dq), f"per-tensor weight scale for {label(mm)}: expected "
                                 f"per-channel scale of length N={n} on axis {n_axis}"))
        elif s.ndim != 1 or s.shape[0] != n or axis != n_axis:
            out.append(Violation("QDQ004", label(b_dq), f"weight scale shape {list(s.shape)} on axis "
                                 f"{attr_int(b_dq, 'axis', 1)} for {label(mm)} with weight {list(wshape)}: "
                                 f"expected length N={n} on axis {n_axis}"))

    for value, prod in graph_output_producers(graph):
        if prod is not None and prod.op_type in ("QuantizeLinear", "DequantizeLinear"):
            out.append(Violation("QDQ011", label(prod), f"graph output {value.name!r} comes straight from "
                                 f"{prod.op_type}: no Q/DQ on outputs"))

    for rm in decomposed_layernorms(graph):
        out.append(Violation("QDQ012", label(rm), "LayerNorm exported as ReduceMean/Sub/Pow/ReduceMean/Sqrt/Div: "
                             "export it as one LayerNormalization op (opset >= 17) so TensorRT keeps it fused"))
    return out

