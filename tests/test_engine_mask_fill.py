"""engine/mask_fill.py: the additive attention mask's float32-lowest fill becomes -16,384, so a fully masked
softmax row is finite in FP16 (it is NaN with the original fill) and the function in float32 stays the same."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sq_export.engine.mask_fill import FILL, finite_mask_fills

ort = pytest.importorskip("onnxruntime")
LOWEST = float(np.finfo(np.float32).min)


def _attention_graph(dtype=np.float32, as_initializer=False):
    """scores [1, 1, 4, 4] + Where(allowed, 0, lowest) → Softmax, the fill a Constant node (as torch.onnx writes it)
    or an initializer; in float16 the fill is what an FP16 engine makes of it (-inf)."""
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    with np.errstate(over="ignore"):
        low = np.array(LOWEST, np.float32).astype(dtype)  # float16: -inf
    zero = numpy_helper.from_array(np.array(0.0, dtype), "zero")
    nodes, inits = [], [zero]
    if as_initializer:
        inits.append(numpy_helper.from_array(low, "fill"))
    else:
        nodes.append(helper.make_node("Constant", [], ["fill"], value=numpy_helper.from_array(low, "fill")))
    nodes += [helper.make_node("Where", ["allowed", "zero", "fill"], ["mask"]),
              helper.make_node("Add", ["scores", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["p"], axis=-1)]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("scores", tp, [1, 1, 4, 4]),
                                          helper.make_tensor_value_info("allowed", TensorProto.BOOL, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("p", tp, [1, 1, 4, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds(dtype):
    rng = np.random.default_rng(0)
    allowed = np.tril(np.ones((4, 4), bool))[None, None].copy()
    allowed[..., 0, :] = False  # a padding query: every key masked
    return {"scores": (rng.normal(size=(1, 1, 4, 4)) * 30).astype(dtype), "allowed": allowed}


def _run(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("as_initializer", [False, True])
def test_fully_masked_row_finite_in_float16(as_initializer):
    m = _attention_graph(np.float16, as_initializer)
    feeds = _feeds(np.float16)
    before = _run(m, feeds)
    assert np.isnan(before[..., 0, :]).all() and np.isfinite(before[..., 1:, :]).all()  # the hazard is real
    assert finite_mask_fills(m) == ["fill"]
    after = _run(m, feeds)
    assert np.isfinite(after).all()
    np.testing.assert_allclose(after[..., 0, :].astype(np.float32).sum(-1), 1.0, atol=1e-3)  # a distribution
    np.testing.assert_array_equal(after[..., 1:, :], before[..., 1:, :])


def test_same_function_in_float32():
    m = _attention_graph(np.float32)
    feeds = _feeds(np.float32)
    before = _run(m, feeds)
    assert finite_mask_fills(m) == ["fill"]
    after = _run(m, feeds)
    np.testing.assert_array_equal(after[..., 1:, :], before[..., 1:, :])  # every row with an allowed key: same bits
    np.testing.assert_allclose(before[..., 0, :], 0.25)  # the fully masked row: uniform in float32, finite after
    assert np.isfinite(after).all()
    assert finite_mask_fills(m) == []  # idempotent: -16,384 is inside FP16's range


def test_other_constants_untouched():
    """A large negative constant that is not only a Where's fill (here also an Add's operand) stays."""
    m = _attention_graph(np.float32)
    m.graph.node.append(helper.make_node("Add", ["p", "fill"], ["q"]))
    assert finite_mask_fills(m) == []
    fill = [n for n in m.graph.node if n.op_type == "Constant"][0].attribute[0].t
    assert float(numpy_helper.to_array(fill)) == LOWEST


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_real_exports_left_padding(family, tmp_path):
    """An exported decoder's mask fills are rewritten, and its logits on a left-padded batch are the same at every
    real position (float32, ONNX Runtime)."""
    pytest.importorskip("torch")
    from conftest import make_tiny
    from sq_export.export.exporter import export_onnx

    model, fam = make_tiny(family)
    path = tmp_path / "m.onnx"
    export_onnx(model, fam, path, weights="qdq")
    m = onnx.load(path)
    done = finite_mask_fills(m)
    assert done
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output[0] in done:
            assert float(numpy_helper.to_array(n.attribute[0].t)) == FILL
    ids = np.array([[0, 0, 3, 4, 5, 2], [1, 3, 4, 5, 2, 8]], np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    b = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_array_equal(b[0, 2:], a[0, 2:])
    np.testing.assert_array_equal(b[1], a[1])
    assert np.isfinite(b).all()


def test_build_applies_it_with_the_fp16_flag():
    """build_engine rewrites the fills whenever the FP16 flag is set, and parses the rewritten graph then."""
    import inspect

    from sq_export.engine import build

    src = inspect.getsource(build.build_engine)
    assert "if plan.fp16_flag:" in src and "finite_mask_fills(model)" in src
    assert "if prescaled or mask_fills:" in src and '"finite_mask_fills": len(mask_fills)' in src
