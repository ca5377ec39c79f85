"""verify_folded: SmoothQuant's per-channel smoothing factors must be folded, never left as a runtime Mul/Div.

SQ001  from each norm output, follow the tensor (through Cast/Identity/Reshape/... and Mul/Div by constants) to the
       QuantizeLinear nodes it feeds; a Mul/Div by a per-channel constant ([C], [1, 1, C], C > 1) on that path is
       an unfolded smoothing factor (it belongs in the norm's gamma/beta).
SQ002  any QuantizeLinear whose input comes straight (through pass-through ops) from a Mul/Div by a per-channel
       constant that is not a norm's own gamma: smoothing that should have been folded into the preceding Linear
       (up_proj -> down_proj, v_proj -> o_proj). Scalar Muls (attention's 1/sqrt(d)) are fine.
The pass only reads the graph; its findings are on `.violations` after the call.
"""

from __future__ import annotations

import onnx_ir as ir

from sq_export.passes.registry import graph_check
from sq_export.passes._graph import (
    PASS_THROUGH,
    Norm,
    Violation,
    find_norms,
    is_per_channel,
    label,
    nodes_of,
    scaling_operand,
)


def _offenders_to_q(value: ir.Value, depth: int = 0) -> tuple[bool, list[ir.Node]]:
    """(whether `value` reaches a QuantizeLinear, per-channel Mul/Div nodes on the paths that do)."""
    if depth > 32:
        return False, []
    reaches, bad = False, []
    for use in value.uses():
        n, idx = use.node, use.idx
        if n.op_type == "QuantizeLinear" and idx == 0:
            reaches = True
            continue
        if n.op_type in PASS_THROUGH and idx == 0:
            r, b = _offenders_to_q(n.outputs[0], depth + 1)
        else:
            so = scaling_operand(n)
            if so is None or so[0] != idx:
                continue
            r, b = _offenders_to_q(n.outputs[0], depth + 1)
            if r and is_per_channel(so[1]):
                b = [n, *b]
        if r:
            reaches = True
            bad.extend(x for x in b if x not in bad)
    return reaches, bad


@graph_check("verify_folded", {
    'SQ001': 'unfolded smoothing: per-channel Mul/Div between a norm output and its QuantizeLinear',
    'SQ002': 'unfolded smoothing: per-channel Mul/Div straight in front of a QuantizeLinear (fold it into the preceding Linear)',
}, order=10)
def find_unfolded(graph: ir.Graph, target: str = "trt", norms: list[Norm] | None = None) -> list[Violation]:
    norms = find_norms(graph) if norms is None else norms
    out: list[Violation] = []
    reported: set[int] = set()
    for norm in norms:
        _, bad = _offenders_to_q(norm.output)
        for n in bad:
            if id(n) in reported:
                continue
            reported.add(id(n))
            out.append(Violation("SQ001", label(n),
                                 f"{n.op_type} by a per-channel constant between norm {norm.name} ({norm.kind}) and "
                                 f"its QuantizeLinear: smoothing not folded into the norm weights (sq-export check "
                                 f"--fix folds it)"))
    norm_nodes = {id(n.node) for n in norms} | {id(n.gamma_node) for n in norms}
    for q in nodes_of(graph, "QuantizeLinear"):
        v = q.inputs[0]
        p = v.producer() if v is not None else None
        while p is not None and p.op_type in PASS_THROUGH:
            v = p.inputs[0]
            p = v.producer() if v is not None else None
        if p is None or id(p) in reported or id(p) in norm_nodes:
            continue
        so = scaling_operand(p)
        if so is not None and is_per_channel(so[1]):
            reported.add(id(p))
            out.append(Violation("SQ002", label(p),
                                 f"{p.op_type} by a per-channel constant {list(so[1].shape)} feeds QuantizeLinear "
                                 f"{label(q)}: smoothing not folded into the preceding layer's weights"))
    return out

