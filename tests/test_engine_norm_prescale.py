"""engine/norm_prescale.py: every decomposed norm divides by its token's max |x| before squaring, so its statistics
cannot overflow FP16 — and the function stays the same (ONNX Runtime, float32). Torch-free except the real exports."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sq_export.engine.norm_prescale import prescale_norms

ort = pytest.importorskip("onnxruntime")

D = 64
EPS = 1e-5


def _norm_graph(form="hf", dtype=np.float32, opset=17, centered=False, eps=True):
    """One norm over the last axis of x [2, 5, D], as exporters write it: HF's RMSNorm (Pow → ReduceMean → Add →
    Sqrt → Div(1, ·) → Mul(x, ·) → Mul(γ)) and variants of the reciprocal root, the square and the centring."""
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(0)
    gamma = (rng.random(D) + 0.5).astype(dtype)
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.array(2.0, dtype), "two"),
             numpy_helper.from_array(np.array(EPS, dtype), "eps"), numpy_helper.from_array(np.array(1.0, dtype), "one"),
             numpy_helper.from_array(np.array(-0.5, dtype), "mhalf")]
    nodes = []
    rm_axes = {"axes": [-1]} if opset < 18 else {}
    rm_in = [] if opset < 18 else ["axes"]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    y = "x"
    if centered:
        nodes += [helper.make_node("ReduceMean", ["x"] + rm_in, ["mu"], keepdims=1, **rm_axes),
                  helper.make_node("Sub", ["x", "mu"], ["xc"])]
        y = "xc"
    if form == "mulsq":
        nodes.append(helper.make_node("Mul", [y, y], ["sq"]))
    else:
        nodes.append(helper.make_node("Pow", [y, "two"], ["sq"]))
    nodes.append(helper.make_node("ReduceMean", ["sq"] + rm_in, ["ms"], keepdims=1, **rm_axes))
    stat = "ms"
    if eps:
        nodes.append(helper.make_node("Add", ["ms", "eps"], ["mse"]))
        stat = "mse"
    if form in ("hf", "mulsq"):
        nodes += [helper.make_node("Sqrt", [stat], ["rt"]), helper.make_node("Div", ["one", "rt"], ["r"]),
                  helper.make_node("Mul", [y, "r"], ["n"])]
    elif form == "reciprocal":
        nodes += [helper.make_node("Sqrt", [stat], ["rt"]), helper.make_node("Reciprocal", ["rt"], ["r"]),
                  helper.make_node("Mul", ["r", y], ["n"])]
    elif form == "div":
        nodes += [helper.make_node("Sqrt", [stat], ["rt"]), helper.make_node("Div", [y, "rt"], ["n"])]
    elif form == "rsqrt_pow":
        nodes += [helper.make_node("Pow", [stat, "mhalf"], ["r"]), helper.make_node("Mul", [y, "r"], ["n"])]
    nodes.append(helper.make_node("Mul", ["n", "gamma"], ["out"]))
    g = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", tp, [2, 5, D])],
                          [helper.make_tensor_value_info("out", tp, [2, 5, D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m, gamma


def _x(dtype=np.float32, massive=20000.0):
    """Rows of ordinary size, rows below 1, and rows with one massive channel (as from layer 12 of SmolLM2)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, D))
    x[0, 1] *= 0.01
    x[1, 2, 7] = massive
    x[1, 3, 0] = -massive
    x[0, 4] *= 300.0
    return x.astype(dtype)


def _reference(x, gamma, centered=False, eps=True):
    x = x.astype(np.float64)
    if centered:
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + (EPS if eps else 0.0)) * gamma.astype(np.float64)


def _run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fused (float32-internal) norm kernel
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("form", ["hf", "reciprocal", "div", "rsqrt_pow", "mulsq"])
@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("centered", [False, True])
def test_same_function_in_float32(form, opset, centered):
    m, gamma = _norm_graph(form, opset=opset, centered=centered)
    x = _x()
    before = _run(m, x)
    assert len(prescale_norms(m)) == 1
    onnx.checker.check_model(m)
    after = _run(m, x)
    ref = _reference(x, gamma, centered)
    np.testing.assert_allclose(before, ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(after, ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(after, before, rtol=2e-5, atol=2e-5)


def test_without_eps_and_idempotent():
    m, gamma = _norm_graph(eps=False)
    assert len(prescale_norms(m)) == 1
    n_nodes = len(m.graph.node)
    assert prescale_norms(m) == [] and len(m.graph.node) == n_nodes  # a second pass changes nothing
    x = _x()
    np.testing.assert_allclose(_run(m, x), _reference(x, gamma, eps=False), rtol=2e-5, atol=2e-5)


def _stats(model, x):
    """The float16 square and mean-of-squares tensors of a norm graph, next to its output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in ("sq", "ms"):
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT16, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out, sq, ms = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return out, sq, ms


@pytest.mark.parametrize("form", ["hf", "reciprocal", "div", "rsqrt_pow"])
def test_float16_statistics_no_longer_overflow(form):
    """The reason for the pass: in float16 the square of |x| = 20,000 is inf (so is the token's mean of squares, and
    what the engine makes of it is up to its kernels); prescaled, every square and every mean is at most 1, and the
    output is right to float16 precision."""
    m, gamma = _norm_graph(form, dtype=np.float16)
    x = _x(np.float16)
    _, sq, ms = _stats(m, x)
    assert np.isinf(sq).any() and np.isinf(ms[1, 2]).all()  # the overflow is real
    assert len(prescale_norms(m)) == 1
    out, sq, ms = _stats(m, x)
    assert np.isfinite(sq).all() and sq.max() <= 1.0 and ms.max() <= 1.0
    np.testing.assert_allclose(out.astype(np.float64), _reference(x, gamma), rtol=1e-2, atol=1e-2)


def test_layernormalization_and_plain_graphs_untouched():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, D])
    g = helper.make_graph([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)], "ln", [x], [y],
                          [numpy_helper.from_array(np.ones(D, np.float32), "g"), numpy_helper.from_array(np.zeros(D, np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    before = m.SerializeToString()
    assert prescale_norms(m) == [] and m.SerializeToString() == before
    # a square that is not a norm's (no reciprocal root of its mean applied to the same value) is left alone
    m2, _ = _norm_graph()
    for n in m2.graph.node:
        if n.op_type == "Mul" and n.input[0] == "x":
            n.input[0] = "sq"  # normalize something else
    assert prescale_norms(m2) == []


@pytest.mark.parametrize("family", ["llama", "glm", "gemma3", "qwen3", "phi3"])
def test_real_exports_prescaled_and_equal(family, tmp_path):
    """Every RMSNorm of an exported decoder (2 per layer + the final one; Gemma 3: 4 per layer, and with Qwen3 the
    per-head q_norm / k_norm) is prescaled and the logits stay the same, with an outlier channel driving the
    residual stream up to |x| ~ 1e4; the quantized graph too."""
    pytest.importorskip("torch")
    import torch

    from conftest import make_tiny
    from sq_export.export.exporter import export_onnx

    model, fam = make_tiny(family)
    with torch.no_grad():  # a massive activation: one embedding channel of a few tokens
        emb = model.get_input_embeddings().weight
        emb[3:9, 5] = 1.0e4
    path = tmp_path / "m.onnx"
    export_onnx(model, fam, path)
    m = onnx.load(path)
    done = prescale_norms(m)
    assert len(done) == sum("RMSNorm" in type(x).__name__ for x in model.modules()) >= 2 * fam.num_layers() + 1
    ids = np.array([[1, 3, 4, 5, 2, 8, 7, 6]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in a.get_inputs()}}
    la, lb = a.run(None, feeds)[0], b.run(None, feeds)[0]
    np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-4 * np.abs(la).max())


def test_build_applies_it_only_with_the_fp16_flag():
    """build_engine prescales when TensorRT 8.x may pick FP16 (the FP16 flag is set), not for strongly typed networks
    (the graph's own types) or --no-fp16 builds: the call site is one condition, checked against the plan."""
    import inspect

    from sq_export.engine import build

    src = inspect.getsource(build.build_engine)
    assert "if prescale_norms and plan.fp16_flag" in src
    assert inspect.signature(build.build_engine).parameters["prescale_norms"].default is True
