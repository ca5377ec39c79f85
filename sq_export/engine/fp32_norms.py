"""Keep normalization math in FP32 inside FP16/INT8 TensorRT 8.x engines.

Real LLM residual streams exceed what FP16 can square: SmolLM2-135M's reach |x| = 24,494, so RMSNorm's
mean(x²) ≈ 1e6 overflows FP16's 65,504 and the engine's logits are garbage (seen on the H100: FP16 engine
perplexity 30,810 vs 25.0 in ONNX Runtime). HF computes these norms in float32 on purpose; with TensorRT's FP16
flag the builder is free to run them in FP16 unless told otherwise. This module finds the norm subgraphs in the
ONNX graph (LayerNormalization nodes; the RMSNorm chain Pow → ReduceMean → Add → Sqrt → Div/Reciprocal) and pins
the matching network layers to FP32 (with precision constraints "prefer").

Torch-free and onnx-ir-free (the kit's Python has only onnx, numpy, polygraphy, tensorrt).
"""

from __future__ import annotations

import onnx

CHAIN = ("ReduceMean", "Add", "Sqrt", "Div", "Reciprocal")


def norm_node_names(onnx_path) -> list[str]:
    m = onnx.load(str(onnx_path), load_external_data=False)
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names = []
    for n in m.graph.node:
        if n.op_type == "LayerNormalization":
            names.append(n.name)
        elif n.op_type == "Pow":
            # x ** 2 feeding a ReduceMean: the start of an RMSNorm; follow the chain until the reciprocal root
            users = consumers.get(n.output[0], [])
            if not any(u.op_type == "ReduceMean" for u in users):
                continue
            names.append(n.name)
            frontier = users
            for _ in range(len(CHAIN)):
                nxt = []
                for u in frontier:
                    if u.op_type in CHAIN and u.name not in names:
                        names.append(u.name)
                        if u.op_type not in ("Div", "Reciprocal"):
                            nxt.extend(consumers.get(u.output[0], []))
                frontier = nxt
    return [x for x in names if x]


def pin_layers_fp32(network, trt, node_names) -> int:
    """Set precision and output types to FP32 on layers named after `node_names`. Returns how many."""
    prefixes = tuple(node_names)
    float_types = {trt.float16, trt.float32}
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not prefixes or not layer.name.startswith(prefixes):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in float_types:
                layer.set_output_type(j, trt.float32)
        count += 1
    return count
