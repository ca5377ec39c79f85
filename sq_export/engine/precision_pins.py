"""Layer precisions TensorRT 8.x must be told (weakly typed networks, FP16/INT8 builder flags).

Pins found from the ONNX graph (``plan_pins``) and applied to the parsed network with precision constraints
"prefer":

* **norms in FP32** (FP16 and INT8 engines). Real LLM residual streams exceed what FP16 can square: SmolLM2-135M's
  reach |x| = 24,494, so RMSNorm's mean(x²) ≈ 1e6 overflows FP16's 65,504 and the engine's logits are garbage
  (seen on the H100: FP16 engine perplexity 30,810 vs 25.0 in ONNX Runtime). The pin covers the whole norm, through
  its γ multiply. In INT8 engines, where the norm feeds a QuantizeLinear, TensorRT 8.6 did not keep to it: the
  SmoothQuant INT8 engines of SmolLM2 stayed garbage with the whole norm pinned (39,467 vs 55.4 in ONNX Runtime);
  engine/norm_prescale.py fixed them (53.524 vs 53.527; docs/TENSORRT.md).
  The RMSNorm chain is Pow → ReduceMean → Add → Sqrt → Div/Reciprocal → Mul(x) [→ Cast] → Mul(γ).
  LayerNormalization nodes are not pinned: an FP32 pin on them made TensorRT 8.6 run the whole Myelin region in
  FP32 (an OPT-shaped FP16 engine 8× slower and twice the size). What makes the norms safe in FP16 whatever
  TensorRT picks is engine/norm_prescale.py (`build` rewrites every decomposed norm; on by default).
* **float MatMuls in FP16** (INT8 engines only). With Q/DQ in the network, TensorRT 8.6 runs the MatMuls that are not
  quantized (attention's Q·Kᵀ and P·V, the LM head) in FP32 on CUDA cores although the FP16 flag is set (Nsight
  Compute on the H100: an OPT-6.7B-shaped 2-layer INT8 engine spent 1.65 ms of 4.13 ms in one FP32 `ffma` GEMM,
  the LM head, and 0.58 ms in FP32 attention GEMMs, while its INT8 GEMMs took 0.73 ms against 1.41 ms for the
  FP16 engine's GEMMs). An FP16 engine runs those MatMuls in FP16, so pinning them to FP16 costs no accuracy
  against the FP16 engine.
* **named nodes in FP32** (`build --fp32-nodes REGEX`), and the experimental **INT8 GEMM output type** (output type
  only, benchmark use).

The graph functions take a path or an already loaded onnx.ModelProto (a build loads it once for all pins).

Torch-free and onnx-ir-free (the kit's Python has only onnx, numpy, polygraphy, tensorrt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from sq_export.errors import BadInput

CHAIN = ("ReduceMean", "Add", "Sqrt", "Div", "Reciprocal")


def _load(model):
    """A path's graph (without external weights), or the ModelProto itself."""
    from sq_export.onnxio.read import load_proto

    return model if isinstance(model, onnx.ModelProto) else load_proto(model)


def norm_node_names(model) -> list[str]:
    """Names of the nodes that compute a decomposed norm: each RMSNorm chain from x² through the multiply by γ.
    LayerNormalization nodes are not pinned: on TensorRT 8.6 an FP32 pin on them turned the whole Myelin region FP32
    (OPT-6.7B-shaped FP16 engine, 4 layers: 36.1 ms and 3,363 MiB instead of 4.4 ms and 1,682 MiB, 2026-11-22)."""
    from sq_export.onnxio.index import GraphIndex

    m = _load(model)
    ix = GraphIndex(m.graph)
    consumers = ix.consumers
    names: list[str] = []

    def add(n):
        if n.name and n.name not in names:
            names.append(n.name)

    for n in m.graph.node:
        if n.op_type == "Pow":
            # x ** 2 feeding a ReduceMean: the start of an RMSNorm; follow the chain until the reciprocal root
            users = consumers.get(n.output[0], [])
            if not any(u.op_type == "ReduceMean" for u in users):
                continue
            add(n)
            frontier, roots = users, []
            for _ in range(len(CHAIN)):
                nxt = []
                for u in frontier:
                    if u.op_type in CHAIN and u.name not in names:
                        add(u)
                        if u.op_type in ("Div", "Reciprocal"):
                            roots.append(u)
                        else:
                            nxt.extend(consumers.get(u.output[0], []))
                frontier = nxt
            # then x · rsqrt [→ Cast] → · γ (a constant): the norm's output
            frontier = [c for r in roots for c in consumers.get(r.output[0], [])]
            for _ in range(3):
                nxt = []
                for u in frontier:
                    if u.op_type not in ("Mul", "Cast"):
                        continue
                    add(u)
                    if u.op_type == "Mul" and any(ix.is_const(i) for i in u.input):
                        continue  # the γ multiply ends the norm
                    nxt.extend(consumers.get(u.output[0], []))
                frontier = nxt
    return names


def quantized_matmul_node_names(model) -> list[str]:
    """MatMul/Gemm nodes with DequantizeLinear on both inputs: the INT8 GEMMs."""
    from sq_export.onnxio.index import GraphIndex

    return [n.name for n, _, _ in GraphIndex(_load(model).graph).quantized_matmuls() if n.name]


def float_matmul_node_names(model) -> list[str]:
    """MatMul/Gemm nodes that are not quantized (not both inputs from DequantizeLinear): attention's score and
    context products, the LM head, Linears kept in float (fallback)."""
    from sq_export.onnxio.index import GraphIndex

    ix = GraphIndex(_load(model).graph)
    quantized = {n.name for n, _, _ in ix.quantized_matmuls()}
    return [n.name for n in ix.graph.node if n.op_type in ("MatMul", "Gemm") and n.name and n.name not in quantized]


def matching_node_names(model, pattern: str) -> list[str]:
    """Nodes whose name matches `pattern` (re.search), except Q/DQ nodes and the INT8 GEMMs (pinning those to a float
    type would take them out of INT8) and Constant nodes: for `build --fp32-nodes`, to find which layer overflows FP16."""
    import re

    from sq_export.onnxio.index import GraphIndex

    ix = GraphIndex(_load(model).graph)
    skip = {n.name for n, _, _ in ix.quantized_matmuls()}
    rx = re.compile(pattern)
    return [n.name for n in ix.graph.node if n.name and rx.search(n.name) and n.name not in skip
            and n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")]


def set_output_types(network, trt, node_names, dtype, tensor_names=()) -> int:
    """Only the float output type (not the precision) of the layers made from `node_names`: e.g. an INT8 GEMM
    writing FP16 instead of FP32. Returns how many layers."""
    prefixes = tuple(node_names)
    tensors = set(tensor_names)
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if _matches(layer, prefixes, tensors):
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float16, trt.float32):
                    layer.set_output_type(j, dtype)
            count += 1
    return count


def node_outputs(model, node_names) -> set[str]:
    """Output tensor names of the named nodes (TensorRT keeps ONNX tensor names on the layers that produce them)."""
    want = set(node_names)
    return {o for n in _load(model).graph.node if n.name in want for o in n.output}


def _matches(layer, prefixes, tensors) -> bool:
    if prefixes and layer.name.startswith(prefixes):
        return True
    return bool(tensors) and any(layer.get_output(j).name in tensors for j in range(layer.num_outputs))


def pin_layers(network, trt, node_names, dtype, tensor_names=()) -> int:
    """Set precision and float output types to `dtype` on the layers made from `node_names`: TensorRT names a layer
    after its ONNX node, sometimes with a suffix (matched by prefix), or names it otherwise but keeps the node's
    output tensor names (`tensor_names`, from node_outputs). Layers with no float output (shape arithmetic) are left
    alone. Returns how many layers."""
    prefixes = tuple(node_names)
    tensors = set(tensor_names)
    float_types = {trt.float16, trt.float32}
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not _matches(layer, prefixes, tensors):
            continue
        if layer.num_outputs and not any(layer.get_output(j).dtype in float_types for j in range(layer.num_outputs)):
            continue
        layer.precision = dtype
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in float_types:
                layer.set_output_type(j, dtype)
        count += 1
    return count


def pin_layers_fp32(network, trt, node_names, tensor_names=()) -> int:
    return pin_layers(network, trt, node_names, trt.float32, tensor_names)


@dataclass
class Pin:
    """One precision pin: the ONNX nodes, the output tensors that also identify their layers, the TensorRT type, and
    (after `apply`) how many layers it reached. `output_only`: set output types, leave layer precision alone."""

    key: str  # the build sidecar's key
    names: list
    tensors: set
    dtype: object
    output_only: bool = False
    extra: dict = field(default_factory=dict)
    layers: int = 0

    def apply(self, network, trt) -> int:
        fn = set_output_types if self.output_only else pin_layers
        self.layers = fn(network, trt, self.names, self.dtype, self.tensors)
        return self.layers

    def record(self) -> dict:
        return {"layers": self.layers, "nodes": len(self.names), **self.extra}


SIDECAR_KEYS = {"norms": "fp32_norm_layers", "float_matmuls": "fp16_float_matmul_layers", "nodes": "fp32_nodes",
                "gemm_output": "int8_gemm_output"}


def plan_pins(model, trt, plan, *, fp32_norms=True, fp16_float_matmuls=True, fp32_nodes=None, int8_gemm_output=None) -> list[Pin]:
    """The pins a TensorRT 8.x build of `model` needs (none for strongly typed networks, whose graph sets the types).
    BadInput for an --fp32-nodes pattern that is invalid or matches nothing."""
    import re

    if plan.strongly_typed:
        if fp32_nodes:
            raise BadInput("--fp32-nodes applies to TensorRT 8.x (a strongly typed network takes the graph's own types)")
        return []
    m = _load(model)
    wanted = []  # (kind, names, dtype, output_only, extra)
    if fp32_norms and plan.fp16_flag:
        wanted.append(("norms", norm_node_names(m), trt.float32, False, {}))
    if fp16_float_matmuls and plan.fp16_flag:  # INT8 engines: attention, LM head, fallback; FP16 engines: every MatMul
        wanted.append(("float_matmuls", float_matmul_node_names(m), trt.float16, False, {}))
    if fp32_nodes:
        try:
            matched = matching_node_names(m, fp32_nodes)
        except re.error as e:
            raise BadInput(f"--fp32-nodes {fp32_nodes!r} is not a valid regular expression ({e})") from None
        if not matched:
            raise BadInput(f"--fp32-nodes {fp32_nodes!r} matches no node of the graph (Q/DQ and INT8 GEMMs excluded)")
        wanted.append(("nodes", matched, trt.float32, False, {"pattern": fp32_nodes}))
    if int8_gemm_output and plan.int8_flag:
        out_dt = {"fp16": trt.float16, "fp32": trt.float32}[int8_gemm_output]
        wanted.append(("gemm_output", quantized_matmul_node_names(m), out_dt, True, {"dtype": int8_gemm_output}))
    return [Pin(SIDECAR_KEYS[k], names, node_outputs(m, names), dt, only, extra) for k, names, dt, only, extra in wanted]
