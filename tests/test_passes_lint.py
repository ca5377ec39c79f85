import pytest

import sq_export.passes as P
from _sqgraphs import load

EXPECTED = {
    "one_sided_dq": {("QDQ001", "/m/model/layers.0/self_attn/q_proj/MatMul")},
    "scale_zero": {("QDQ002", "/m/model/layers.0/mlp/up_proj/QuantizeLinear")},
    "scale_nan": {("QDQ002", "/m/model/layers.0/mlp/up_proj/QuantizeLinear")},
    "wrong_weight_axis": {("QDQ004", "/m/model/layers.0/self_attn/k_proj/DequantizeLinear_1")},
    "nonzero_zp": {("QDQ005", "/m/model/layers.0/self_attn/q_proj/QuantizeLinear")},
    "uint8_zp": {("QDQ006", "/m/model/layers.0/self_attn/q_proj/QuantizeLinear")},
    "dangling_q": {("QDQ008", "/m/model/dangling/QuantizeLinear")},
    "duplicate_q": {("QDQ010", "/m/model/layers.0/self_attn/k_proj/QuantizeLinear")},
    "qdq_on_output": {("QDQ011", "/lm_head/DequantizeLinear")},
    "decomposed_ln": {("QDQ012", "/m/model/layers.0/input_layernorm/ReduceMean")},
}


@pytest.mark.parametrize("name", ["clean_rms", "clean_ln", "clean_rms_int8w", "clean_ln_int8w", "float_rms",
                                  "unfolded_mul_rms", "mul_before_down"])
def test_clean(name):
    assert P.lint_qdq(load(name)) == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_violation(name):
    got = {(v.rule, v.node) for v in P.lint_qdq(load(name))}
    assert got == EXPECTED[name]
    for v in P.lint_qdq(load(name)):
        assert v.rule in P.RULES and v.message


def test_gemm_transb_axis0_is_right_and_axis1_wrong():
    m = load("clean_ln")
    dq = next(n for n in m.graph.node if n.name == "/m/model/layers.0/mlp/up_proj/DequantizeLinear_1")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
    assert P.lint_qdq(m) == []
    for n in m.graph.node:
        if n.name.startswith("/m/model/layers.0/mlp/up_proj/") and n.name.endswith("Linear_1"):
            next(a for a in n.attribute if a.name == "axis").i = 1
    assert [v.rule for v in P.lint_qdq(m)] == ["QDQ004"]


def test_qdq_pair_mismatch_and_dangling_dq():
    import numpy as np
    from onnx import numpy_helper

    m = load("clean_rms")
    m.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "other_scale"))
    dq = next(n for n in m.graph.node if n.name == "/m/model/layers.0/mlp/down_proj/DequantizeLinear")
    dq.input[1] = "other_scale"
    assert [v.rule for v in P.lint_qdq(m)] == ["QDQ007"]
    m = load("clean_rms")
    q = next(n for n in m.graph.node if n.name == "/m/model/layers.0/mlp/down_proj/QuantizeLinear")
    dq = next(n for n in m.graph.node if n.name == "/m/model/layers.0/mlp/down_proj/DequantizeLinear")
    dq.input[0] = q.input[0]  # DQ of a float activation, Q now dangling
    assert sorted(v.rule for v in P.lint_qdq(m)) == ["QDQ008", "QDQ009"]


def test_ort_target_accepts_uint8_activations_only():
    u8 = P.activations_to_uint8(load("clean_rms"))
    assert P.lint_qdq(u8, target="ort") == []
    assert {v.rule for v in P.lint_qdq(u8)} == {"QDQ006"}
