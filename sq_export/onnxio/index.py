"""GraphIndex: lookups in an onnx.GraphProto (torch-free, onnx-ir-free)."""

from __future__ import annotations


class GraphIndex:
    """Producers, consumers and constant values of an ONNX graph (initializers and Constant nodes), torch-free and
    onnx-ir-free: what the engine side (precision_pins, norm_prescale) and the graph tools (tools/qdq_bypass.py,
    tools/int8_ranges.py) look up. A snapshot: built once, not updated when the graph changes."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def is_const(self, name) -> bool:
        return name in self.inits or name in self.consts

    def tensor(self, name):
        """The TensorProto of a constant tensor, or None when `name` is computed."""
        if name in self.inits:
            return self.inits[name]
        if name in self.consts:
            return self.consts[name].attribute[0].t
        return None

    def array(self, name):
        """The value of a constant tensor as numpy, or None when `name` is computed."""
        from onnx import numpy_helper

        t = self.tensor(name)
        return None if t is None else numpy_helper.to_array(t)

    def scalar(self, name) -> float | None:
        """The value of a one-element constant tensor, else None."""
        a = self.array(name)
        return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None

    def quantized_matmuls(self):
        """(MatMul/Gemm node, activation DequantizeLinear, weight DequantizeLinear) for each INT8 GEMM."""
        for n in self.graph.node:
            if n.op_type in ("MatMul", "Gemm"):
                dqs = [self.producer.get(i) for i in n.input[:2]]
                if all(d is not None and d.op_type == "DequantizeLinear" for d in dqs):
                    yield n, dqs[0], dqs[1]
