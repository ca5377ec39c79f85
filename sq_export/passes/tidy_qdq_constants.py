"""tidy_qdq_constants: every QuantizeLinear/DequantizeLinear reads its scale and zero-point straight from its own
initializers, with no Identity in between.

The TorchScript exporter deduplicates equal constants and routes many uses through Identity nodes, so one int8
zero-point tensor ends up feeding dozens of Identity nodes. TensorRT 8.6 refuses that ("Int8 constant is only
allowed before DQ node", qdqGraphOptimizer.cpp matchInt8ConstantDQ, seen on the lent H100 with SmolLM2). This
pass removes Identity nodes whose input is a constant (consumers read the constant directly) and gives each
Q/DQ node its own zero-point initializer named after the node. Numerically a no-op.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_export.passes._graph import add_initializer, const_array, drop_if_unused, is_const

QDQ = ("QuantizeLinear", "DequantizeLinear")


def _bypass_constant_identities(graph: ir.Graph) -> int:
    n = 0
    for node in list(graph):
        if node.op_type != "Identity" or not is_const(node.inputs[0]):
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        src = node.inputs[0]
        for user, idx in list(out.uses()):
            user.replace_input_with(idx, src)
        graph.remove(node, safe=True)
        n += 1
    return n


def _own_zero_points(graph: ir.Graph) -> int:
    n = 0
    for node in list(graph):
        if node.op_type not in QDQ or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        zp = node.inputs[2]
        if len(zp.uses()) == 1 and zp.is_initializer():
            continue
        arr = const_array(zp)
        if arr is None:
            continue
        base = f"{node.name or node.outputs[0].name}.zero_point"
        node.replace_input_with(2, add_initializer(graph, base, np.array(arr, copy=True)))
        drop_if_unused(graph, zp)
        n += 1
    return n


class TidyQDQConstantsPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.identities = 0
        self.zero_points = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.identities = _bypass_constant_identities(model.graph)
        self.zero_points = _own_zero_points(model.graph)
        return ir.passes.PassResult(model, modified=bool(self.identities or self.zero_points))

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type in QDQ and len(node.inputs) > 2 and node.inputs[2] is not None:
                zp = node.inputs[2]
                if const_array(zp) is not None and (len(zp.uses()) != 1 or not zp.is_initializer()):
                    raise ir.passes.PostconditionError(f"{node.name}: zero-point still shared or not an initializer")
