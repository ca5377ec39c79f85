"""sq-export's metadata in an ONNX file (``sq_export.*`` metadata_props), read without torch."""

from __future__ import annotations

from sq_export.errors import BadInput


def read_metadata(path) -> dict:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path} is not a readable ONNX file ({type(e).__name__}); export it again") from e
    return {p.key.removeprefix("sq_export."): p.value for p in m.metadata_props if p.key.startswith("sq_export.")}


class GraphIndex:
    """Producers and constant values of an ONNX graph (initializers and Constant nodes), torch-free: what the graph
    tools (tools/qdq_bypass.py, tools/int8_ranges.py) look up."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inits = {t.name: t for t in graph.initializer}
        self.consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def array(self, name):
        """The value of a constant tensor as numpy, or None when `name` is computed."""
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.consts:
            return numpy_helper.to_array(self.consts[name].attribute[0].t)
        return None

    def quantized_matmuls(self):
        """(MatMul/Gemm node, activation DequantizeLinear, weight DequantizeLinear) for each INT8 GEMM."""
        for n in self.graph.node:
            if n.op_type in ("MatMul", "Gemm"):
                dqs = [self.producer.get(i) for i in n.input[:2]]
                if all(d is not None and d.op_type == "DequantizeLinear" for d in dqs):
                    yield n, dqs[0], dqs[1]
