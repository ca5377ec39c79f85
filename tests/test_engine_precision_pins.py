"""Layer precision pins of TensorRT 8.x builds (norms FP32, un-quantized MatMuls of INT8 engines FP16): the ONNX side
of the selection and the network side with a stand-in network (no GPU needed)."""

import types
from pathlib import Path

import pytest

from sq_export.engine.precision_pins import (
    float_matmul_node_names,
    norm_node_names,
    pin_layers,
    pin_layers_fp32,
    quantized_matmul_node_names,
    set_output_types,
)


@pytest.mark.parametrize("family,kind", [("llama", "Pow"), ("opt", "LayerNormalization"), ("gemma3", "Pow"), ("gpt_neox", "LayerNormalization")])
def test_norm_nodes_found_in_real_exports(family, kind, tmp_path):
    """RMSNorm chains are pinned whole; LayerNormalization nodes not at all (an FP32 pin on them made TensorRT 8.6 run
    the whole Myelin region in FP32)."""
    pytest.importorskip("torch")
    from conftest import make_tiny
    from sq_export.export.exporter import export_onnx

    model, fam = make_tiny(family)
    export_onnx(model, fam, tmp_path / "m.onnx")
    names = norm_node_names(tmp_path / "m.onnx")
    n_norms = 2 * fam.num_layers() + 1  # two per layer + the final norm
    if kind == "Pow":  # Gemma 3: four per layer and the per-head q_norm / k_norm
        n_norms = sum("RMSNorm" in type(x).__name__ for x in model.modules())
    if kind == "LayerNormalization":
        import onnx

        assert sum(n.op_type == kind for n in onnx.load(tmp_path / "m.onnx").graph.node) == n_norms
        assert names == []
        return
    assert sum(kind in n for n in names) == n_norms
    if kind == "Pow":  # the whole chain, through the multiply by γ, per norm
        for op in ("ReduceMean", "Sqrt"):
            assert sum(op in n for n in names) == n_norms
        import onnx

        m = onnx.load(tmp_path / "m.onnx")
        inits = {t.name for t in m.graph.initializer}
        by_name = {n.name: n for n in m.graph.node}
        gamma_muls = [x for x in names if by_name[x].op_type == "Mul" and any(i in inits for i in by_name[x].input)]
        assert len(gamma_muls) == n_norms
        # every pinned γ multiply is a norm's output: its output feeds no other pinned node
        pinned_inputs = {i for x in names for i in by_name[x].input}
        assert not any(by_name[x].output[0] in pinned_inputs for x in gamma_muls)
        # ... and nothing after the norm is pinned (the attention/MLP MatMuls are not)
        assert not any(by_name[x].op_type in ("MatMul", "Gemm", "QuantizeLinear") for x in names)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_float_matmuls_are_the_unquantized_ones(family, tmp_path):
    pytest.importorskip("torch")
    from conftest import make_tiny, token_batches
    from sq_export.quant.calibrate import calibrate
    from sq_export.export.exporter import export_onnx
    from sq_export.quant.qlinear import quantize_model, static_scales

    model, fam = make_tiny(family)
    act_max = calibrate(model, fam, token_batches())
    export_onnx(model, fam, tmp_path / "fp.onnx")
    names = fam.quantized_linears()
    quantize_model(model, names, "static", static_scales(act_max, names))
    export_onnx(model, fam, tmp_path / "sq.onnx", weights="qdq")
    L = fam.num_layers()
    fp = float_matmul_node_names(tmp_path / "fp.onnx")
    sq = float_matmul_node_names(tmp_path / "sq.onnx")
    # the float graph: every Linear (4 attention + 2 or 3 MLP per layer), 2 attention products per layer, the LM head
    assert len(fp) == len(names) + 2 * L + 1
    # the quantized graph: only attention's two products per layer and the LM head stay float
    assert len(sq) == 2 * L + 1
    assert not any("_proj" in n or "fc" in n.split("/")[-2] for n in sq)
    # and the INT8 GEMMs are exactly the rest
    assert quantized_matmul_node_names(tmp_path / "fp.onnx") == []
    q = quantized_matmul_node_names(tmp_path / "sq.onnx")
    assert len(q) == len(names) and not set(q) & set(sq)


def test_pin_sets_fp32_on_matching_layers_only():
    trt = types.SimpleNamespace(float16="half", float32="float", int8="int8")

    class Out:
        def __init__(self, dt, name=""):
            self.dtype, self.name = dt, name

    class Layer:
        def __init__(self, name, dts):
            self.name, self.outs, self.precision, self.set = name, [Out(d) for d in dts], None, {}

        num_outputs = property(lambda s: len(s.outs))

        def get_output(self, j):
            return self.outs[j]

        def set_output_type(self, j, t):
            self.set[j] = t

    layers = [Layer("/m/layers.0/input_layernorm/Pow", ["half"]), Layer("/m/layers.0/self_attn/q_proj/MatMul", ["half"]), Layer("/m/layers.0/input_layernorm/ReduceMean", ["half", "int8"])]
    net = types.SimpleNamespace(num_layers=3, get_layer=lambda i: layers[i])
    n = pin_layers_fp32(net, trt, ["/m/layers.0/input_layernorm/Pow", "/m/layers.0/input_layernorm/ReduceMean"])
    assert n == 2
    assert layers[0].precision == "float" and layers[0].set == {0: "float"}
    assert layers[1].precision is None
    assert layers[2].set == {0: "float"}
    # the FP16 pin of float MatMuls goes through the same function
    assert pin_layers(net, trt, ["/m/layers.0/self_attn/q_proj/MatMul"], trt.float16) == 1
    assert layers[1].precision == "half" and layers[1].set == {0: "half"}
    # output type only: precision untouched
    layers[2].precision, layers[2].set = None, {}
    assert set_output_types(net, trt, ["/m/layers.0/input_layernorm/ReduceMean"], trt.float16) == 1
    assert layers[2].precision is None and layers[2].set == {0: "half"}
    # a layer TensorRT named otherwise is still found by the ONNX output tensor it produces
    odd = Layer("(Unnamed Layer* 7) [Normalization]", ["half"])
    odd.outs[0].name = "/m/layers.0/ln/LayerNormalization_output_0"
    layers.append(odd)
    net.num_layers = 4
    assert pin_layers_fp32(net, trt, ["/m/layers.0/ln/LayerNormalization"], {"/m/layers.0/ln/LayerNormalization_output_0"}) == 1
    assert odd.precision == "float" and odd.set == {0: "float"}
    # shape arithmetic (no float output) is never pinned
    shape = Layer("/m/layers.0/ln/Shape", ["int32"])
    layers.append(shape)
    net.num_layers = 5
    assert pin_layers_fp32(net, trt, ["/m/layers.0/ln/"]) == 0
    assert shape.precision is None and shape.set == {}


def test_fp32_nodes_by_regex_skip_qdq_and_int8_gemms():
    from sq_export.engine.precision_pins import matching_node_names

    g = str(Path(__file__).resolve().parent / "fixtures" / "graphs" / "decode_llama_sq.onnx")
    res = matching_node_names(g, r"layers\.\d+/Add(_1)?$")
    assert res == [f"/model/model/layers.{i}/{a}" for i in range(2) for a in ("Add", "Add_1")]
    # everything under o_proj: its Q/DQ nodes and the INT8 MatMul are left alone, nothing else is there
    assert matching_node_names(g, "o_proj/") == []
    assert "/model/lm_head/MatMul" in matching_node_names(g, "lm_head")


def test_plan_pins_from_one_loaded_graph():
    import onnx

    from sq_export.engine.precision_pins import SIDECAR_KEYS, plan_pins
    from sq_export.engine.trt_compat import graph_facts_from_model, plan_build
    from sq_export.errors import BadInput

    trt = types.SimpleNamespace(float16="half", float32="float")
    m = onnx.load(str(Path(__file__).resolve().parent / "fixtures" / "graphs" / "decode_llama_sq.onnx"), load_external_data=False)
    plan = plan_build("8.6.0", "int8", graph_facts_from_model(m))
    pins = {p.key: p for p in plan_pins(m, trt, plan)}
    assert set(pins) == {SIDECAR_KEYS["norms"], SIDECAR_KEYS["float_matmuls"]}
    assert pins["fp32_norm_layers"].dtype == "float" and pins["fp32_norm_layers"].names == norm_node_names(m)
    assert pins["fp16_float_matmul_layers"].names == float_matmul_node_names(m)
    assert "/model/lm_head/MatMul" in pins["fp16_float_matmul_layers"].names
    assert all(p.tensors for p in pins.values())  # the output tensors that also identify each pinned layer
    more = {p.key: p for p in plan_pins(m, trt, plan, fp32_nodes=r"layers\.\d+/Add(_1)?$", int8_gemm_output="fp16")}
    assert more["fp32_nodes"].record() == {"layers": 0, "nodes": 4, "pattern": r"layers\.\d+/Add(_1)?$"}
    assert more["int8_gemm_output"].output_only and more["int8_gemm_output"].names == quantized_matmul_node_names(m)
    assert plan_pins(m, trt, plan_build("8.6.0", "int8", graph_facts_from_model(m), fp16=False)) == []  # no FP16: nothing to pin
    # an FP16 engine of the float graph: every MatMul is a float one, pinned to FP16 beside the FP32 norms (the 7B
    # FP16 chain built without this pin ran at 112 TFLOP/s on the H200, a fifth of its INT8 twin's rate)
    f = onnx.load(str(Path(__file__).resolve().parent / "fixtures" / "graphs" / "decode_llama_fp.onnx"), load_external_data=False)
    fp = {p.key: p for p in plan_pins(f, trt, plan_build("8.6.0", "fp16", graph_facts_from_model(f)))}
    assert set(fp) == {SIDECAR_KEYS["norms"], SIDECAR_KEYS["float_matmuls"]} and fp["fp16_float_matmul_layers"].dtype == "half"
    assert set(fp["fp16_float_matmul_layers"].names) == {n.name for n in f.graph.node if n.op_type in ("MatMul", "Gemm")}
    assert SIDECAR_KEYS["float_matmuls"] not in {p.key for p in plan_pins(f, trt, plan_build("8.6.0", "fp16", graph_facts_from_model(f)), fp16_float_matmuls=False)}
    with pytest.raises(BadInput, match="not a valid regular expression"):
        plan_pins(m, trt, plan, fp32_nodes="(")
    with pytest.raises(BadInput, match="matches no node"):
        plan_pins(m, trt, plan, fp32_nodes="no_such_node")
    strongly = plan_build("10.3.0", "int8", graph_facts_from_model(m))
    assert plan_pins(m, trt, strongly) == []
    with pytest.raises(BadInput, match="TensorRT 8.x"):
        plan_pins(m, trt, strongly, fp32_nodes="Add")
