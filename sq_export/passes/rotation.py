"""rotation: a graph exported with `--rotate-down B` (sq_export.quant.hadamard) rotates every MLP output Linear's input
before quantizing it (rules ROT001–ROT003).

Such a graph records `sq_export.rotate_down` B. Its down_proj weights hold Rᵀ·W, so each one's input must be x·R:
Reshape → MatMul with a constant [B, B] orthonormal block → Reshape, feeding the QuantizeLinear of that Linear. A
graph that lost a rotation (or kept one too many) computes another model, silently: its weights no longer match
their inputs.

    ROT001  the number of rotations (MatMul with a constant [B, B] feeding a QuantizeLinear) is not the number of
            rotated Linears the graph records (`sq_export.rotated_linears`: a Linear the fallback kept in float is not
            rotated), or without that record not one per layer (one per Softmax: attention layers)
    ROT002  a rotation's constant is not orthonormal (H·Hᵀ ≠ I)
    ROT003  a MatMul with a constant [B, B] block does not feed a QuantizeLinear (the rotated input is not quantized)

A graph without the metadata is not checked. Torch-free, structural; reads only the [B, B] constants.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_export.passes._graph import Violation, const_array, const_shape, is_const, label, nodes_of
from sq_export.passes.registry import graph_check, graph_metadata

THROUGH = ("Reshape", "Identity", "Cast", "Flatten")


def _feeds_quantize(value: ir.Value, depth: int = 4) -> bool:
    for use in value.uses():
        n = use.node
        if n.op_type == "QuantizeLinear" and use.idx == 0:
            return True
        if depth and n.op_type in THROUGH and use.idx == 0 and _feeds_quantize(n.outputs[0], depth - 1):
            return True
    return False


@graph_check("rotation", {
    "ROT001": "--rotate-down graph: not one input rotation per layer",
    "ROT002": "--rotate-down graph: a rotation block is not orthonormal",
    "ROT003": "--rotate-down graph: a rotation does not feed a QuantizeLinear",
}, order=70)
def find_rotation_problems(graph: ir.Graph, target: str = "trt") -> list[Violation]:
    meta = graph_metadata(graph)
    if not meta.get("rotate_down"):
        return []
    try:
        b = int(meta["rotate_down"])
    except ValueError:
        return [Violation("ROT001", "<metadata>", f"rotate_down {meta['rotate_down']!r} is not an integer")]
    out, found = [], 0
    for mm in nodes_of(graph, "MatMul"):
        h = next((v for v in mm.inputs[1:2] if v is not None and is_const(v) and const_shape(v) == (b, b)), None)
        if h is None:
            continue
        if not _feeds_quantize(mm.outputs[0]):
            out.append(Violation("ROT003", label(mm), f"this [{b}, {b}] block rotation does not feed a QuantizeLinear"))
            continue
        found += 1
        a = const_array(h)
        if a is None or not np.allclose(a.astype(np.float64) @ a.astype(np.float64).T, np.eye(b), atol=1e-3):
            out.append(Violation("ROT002", label(mm), f"the rotation block {h.name} is not orthonormal"))
    recorded = meta.get("rotated_linears")
    want = int(recorded) if recorded and recorded.isdigit() else len(nodes_of(graph, "Softmax"))
    if found != want:
        why = f"the {want} rotated Linears the graph records" if recorded else f"one per layer ({want} Softmax)"
        out.append(Violation("ROT001", "<graph>", f"{found} input rotations of [{b}, {b}] blocks feed a QuantizeLinear, "
                             f"expected {why}: those Linears' weights hold Rᵀ·W, so each needs its input rotated"))
    return out
