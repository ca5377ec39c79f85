"""Norm layers pinned to FP32 in TensorRT 8.x FP16/INT8 builds: the ONNX side of the selection (no GPU needed)."""

import types

import pytest

from sq_export.engine.fp32_norms import norm_node_names, pin_layers_fp32


@pytest.mark.parametrize("family,kind", [("llama", "Pow"), ("opt", "LayerNormalization")])
def test_norm_nodes_found_in_real_exports(family, kind, tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import make_tiny
    from sq_export.export import export_onnx

    model, fam = make_tiny(family)
    export_onnx(model, fam, tmp_path / "m.onnx")
    names = norm_node_names(tmp_path / "m.onnx")
    n_norms = 2 * fam.num_layers() + 1  # two per layer + the final norm
    assert sum(kind in n for n in names) == n_norms
    if kind == "Pow":  # the whole chain up to the reciprocal root, per norm
        for op in ("ReduceMean", "Sqrt"):
            assert sum(op in n for n in names) == n_norms


def test_pin_sets_fp32_on_matching_layers_only():
    trt = types.SimpleNamespace(float16="half", float32="float", int8="int8")

    class Out:
        def __init__(self, dt):
            self.dtype = dt

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
