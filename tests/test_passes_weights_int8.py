import numpy as np
import onnx
import pytest

import sq_export.passes as P
from _sqgraphs import feeds, load, ops, run


@pytest.mark.parametrize("name", ["clean_rms", "clean_ln"])
def test_weights_int8_same_outputs(name):
    m = load(name)
    w = P.weights_to_int8(m)
    onnx.checker.check_model(w, full_check=True)
    assert ops(m)["QuantizeLinear"] - ops(w)["QuantizeLinear"] == 6  # q, k, v, o, up, down
    assert ops(w)["DequantizeLinear"] == ops(m)["DequantizeLinear"]
    inits = {i.name: i for i in w.graph.initializer}
    for n in w.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
    assert not any(n.endswith("_proj.weight") for n in inits)  # float weights dropped
    assert P.lint_qdq(w) == [] and P.verify_folded(w) == []
    for seed in range(2):
        f = feeds(seed)
        np.testing.assert_array_equal(run(w, f), run(m, f))
    # the builder's own int8 form (rint/clip) agrees bit for bit
    np.testing.assert_array_equal(run(w, feeds()), run(load(f"{name}_int8w"), feeds()))


def test_quantize_matches_onnx_quantizelinear():
    from onnx import helper, TensorProto
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 48)) * 3).astype(np.float32)
    x[0, :4] = [0.5, 1.5, -0.5, -2.5]  # ties: half to even
    s = np.full(48, 1.0, np.float32)
    s[4:] = rng.uniform(0.001, 0.05, 44).astype(np.float32)  # small scales saturate
    z = np.zeros(48, np.int8)
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=1)], "q",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 48])],
                          [helper.make_tensor_value_info("y", TensorProto.INT8, [64, 48])],
                          [onnx.numpy_helper.from_array(s, "s"), onnx.numpy_helper.from_array(z, "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    mine = P.quantize_like_onnx(x, s, z, axis=1)
    assert mine.dtype == np.int8
    np.testing.assert_array_equal(mine, ref)
    assert mine[0, :4].tolist() == [0, 2, 0, -2]
    assert mine.min() == -128 and mine.max() == 127
