import collections

import numpy as np
import onnx
import pytest

import sq_export.passes as P
from _sqgraphs import feeds, load, ops, run


@pytest.mark.parametrize("name", ["clean_rms", "clean_ln", "clean_rms_int8w"])
def test_uint8_same_outputs(name):
    m = load(name)
    u = P.activations_to_uint8(m)
    onnx.checker.check_model(u, full_check=True)
    assert ops(u) == ops(m)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in u.graph.initializer}
    for n in u.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            weight = n.input[0] in inits or (n.op_type == "DequantizeLinear" and "weight" in n.input[0])
            if weight or n.name.endswith("Linear_1"):
                assert zp.dtype == np.int8 and not zp.any()
            else:
                assert zp.dtype == np.uint8 and zp.item() == 128
    for seed in range(2):
        f = feeds(seed)
        np.testing.assert_array_equal(run(u, f), run(m, f))
        # ORT's fused integer kernels (see test_ort_fuses_uint8) agree up to float rounding
        np.testing.assert_allclose(run(u, f, optimize=True), run(u, f), rtol=1e-5, atol=1e-5)


def _optimized_ops(model, tmp_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath)
    return {n.name: n.op_type for n in opt.graph.node}, collections.Counter(n.op_type for n in opt.graph.node)


def test_ort_fuses_uint8(tmp_path):
    """Evidence for ort_uint8's docstring: uint8 activations fuse every Linear into MatMulIntegerToFloat."""
    u = P.activations_to_uint8(load("clean_rms_int8w"))
    by_name, counts = _optimized_ops(u, tmp_path)
    for proj in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/up_proj",
                 "mlp/down_proj"):
        assert by_name[f"/m/model/layers.0/{proj}/MatMul"] == "MatMulIntegerToFloat"
    assert by_name["/lm_head/MatMul"] == "MatMul"  # float lm_head stays float
    assert counts["DequantizeLinear"] == 0
    # int8 activations: the shared q/k/v DQ is not fused (stays DQ -> float MatMul)
    by_name8, _ = _optimized_ops(load("clean_rms_int8w"), tmp_path)
    assert by_name8["/m/model/layers.0/self_attn/q_proj/MatMul"] == "MatMul"
    assert by_name8["/m/model/layers.0/mlp/up_proj/MatMul"] == "MatMulIntegerToFloat"


def test_gemm_with_bias_is_not_fused(tmp_path):
    u = P.activations_to_uint8(load("clean_ln_int8w"))
    by_name, _ = _optimized_ops(u, tmp_path)
    assert by_name["/m/model/layers.0/mlp/up_proj/Gemm"] == "Gemm"
    assert by_name["/m/model/layers.0/self_attn/q_proj/MatMul"] == "MatMulIntegerToFloat"
