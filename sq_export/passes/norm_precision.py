"""norm_precision: in a float16 graph, norm statistics are computed in float32 (rule FP16001).

Real residual streams reach |x| ~ 24,000 (SmolLM2: 24,494), so an RMSNorm's mean(x²) (~1e6) overflows float16
(max 65,504) and the normalized activations collapse to 0. A float16 graph (its first output is float16) must
therefore square in float32: the RMSNorm's Pow/Mul reads a Cast to FLOAT (HF's own `.to(torch.float32)`, which
`export --dtype fp16` keeps) or a value typed float32, and a LayerNormalization keeps stash_type 1 (float32
mean/variance, the default). Float32 graphs pass trivially. Structural check (no type inference needed).
"""

from __future__ import annotations

import onnx_ir as ir

from sq_export.passes.registry import graph_check
from sq_export.passes._graph import Violation, _rsqrt_of, attr_int, find_norms, label, walk_back


def _is_float16_graph(graph: ir.Graph) -> bool:
    return bool(graph.outputs) and graph.outputs[0].dtype == ir.DataType.FLOAT16


def _square_input(norm) -> tuple[ir.Node, ir.Value] | None:
    """(the Pow/Mul squaring node, its input) of an RMSNorm's mean of squares."""
    for v in norm.gamma_node.inputs:
        p = walk_back(v)
        if p is None or len(p.inputs) != 2:
            continue
        cands = []
        if p.op_type == "Mul":
            cands = [_rsqrt_of(p.inputs[i], divisor=False) for i in (0, 1)]
        elif p.op_type == "Div":
            cands = [_rsqrt_of(p.inputs[1], divisor=True)]
        for c in cands:
            if c is not None:
                rm, _ = c
                sq = rm.inputs[0].producer()
                if sq is not None:
                    return sq, sq.inputs[0]
    return None


def _float32(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.dtype == ir.DataType.FLOAT:
        return True
    p = value.producer()
    return p is not None and p.op_type == "Cast" and attr_int(p, "to", 0) == ir.DataType.FLOAT.value


@graph_check("norm_precision", {
    'FP16001': 'float16 graph computes norm statistics in float16 (mean(x^2) overflows for |x| > 256)',
}, order=30)
def find_fp16_norm_statistics(graph: ir.Graph, target: str = "trt") -> list[Violation]:
    if not _is_float16_graph(graph):
        return []
    out = []
    for norm in find_norms(graph):
        if norm.kind == "layernorm" and norm.node.op_type == "LayerNormalization":
            if attr_int(norm.node, "stash_type", 1) != 1:
                out.append(Violation("FP16001", label(norm.node), "LayerNormalization with stash_type "
                                     f"{attr_int(norm.node, 'stash_type', 1)} in a float16 graph: mean/variance "
                                     "in float16 overflow for |x| > 256; use stash_type 1"))
        elif norm.kind in ("rmsnorm", "layernorm_decomposed"):
            found = _square_input(norm)
            if found is not None and not _float32(found[1]):
                out.append(Violation("FP16001", label(found[0]), f"{norm.kind} {norm.name} squares its input in "
                                     "float16: mean(x²) overflows float16 for |x| > 256; Cast to float32 before the "
                                     "square and back after the normalization"))
    return out

