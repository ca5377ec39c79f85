"""`export --weights qdq16` (passes/weights_fp16.py): float16 (q·s) -> Cast -> Q -> DQ, the TensorRT 8.6 form at half
the bytes of float32 W -> Q -> DQ. The INT8 values are the float32 form's, so ONNX Runtime's logits are bit-identical;
storing W itself in float16 would move some INT8 values (measured here)."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import FAMILIES, make_tiny, token_batches
from sq_export import api
from sq_export.measure.perplexity import ort_session
from sq_export.passes.weights_fp16 import fp16_weight
from sq_export.passes.weights_int8 import quantize_like_onnx


def _quantized(family):
    model, _ = make_tiny(family)
    ids = token_batches(1, 600, seed=5)[0]
    calib = api.calibrate(model, None, ids, samples=4, seq_len=32, rows=None)
    return api.quantize(model, calib, api.Recipe.paper())


def _weight_bytes(path) -> dict:
    """Bytes of the initializers feeding a QuantizeLinear (directly or through a Cast), by element type."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    cast_src = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    out = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            src = cast_src.get(n.input[0], n.input[0])
            t = inits.get(src)
            if t is not None and len(t.dims) == 2:
                a = numpy_helper.to_array(t)
                out[a.dtype.name] = out.get(a.dtype.name, 0) + a.nbytes
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_qdq16_gives_the_same_logits_at_half_the_weight_bytes(family, tmp_path):
    qm = _quantized(family)
    a, b = tmp_path / "qdq.onnx", tmp_path / "qdq16.onnx"
    api.export_onnx(qm, a, weights="qdq")
    res = api.export_onnx(qm, b, weights="qdq16")
    assert res.metadata["weights_fp16"] == len(qm.prepared.quantized) and res.metadata["weights_kept_float32"] == 0
    wa, wb = _weight_bytes(a), _weight_bytes(b)
    assert set(wa) == {"float32"} and set(wb) == {"float16"} and wb["float16"] * 2 == wa["float32"]
    api.check(b).raise_for_violations()  # the graph passes see the Cast'ed float16 weights as constant weights
    ids = token_batches(2, 24, seed=11)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    la = ort_session(str(a)).run(["logits"], feed)[0]
    lb = ort_session(str(b)).run(["logits"], feed)[0]
    assert np.array_equal(la, lb)


def test_fp16_of_the_quantized_weight_keeps_every_int8_value_and_fp16_of_w_does_not():
    """A 4096 x 4096 Gaussian weight with a few outlier columns (a 7B projection's shape), per-output-channel
    scales: float16(q·s) re-quantizes to q everywhere; float16(W) moves a fraction of the INT8 values by one step
    (printed; ~0.5 % here: elements whose W/s lies within 2^-11·|W/s| of a half-integer)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g) * 0.02
    w[:, :8] *= 30
    w = w.numpy()
    s = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)  # [K, N] layout, per output channel on axis 1
    q = quantize_like_onnx(w, s, None, 1)
    w16 = fp16_weight(w, s, None, 1)
    assert w16 is not None and w16.dtype == np.float16
    assert np.array_equal(quantize_like_onnx(w16.astype(np.float32), s, None, 1), q)
    raw = quantize_like_onnx(w.astype(np.float16).astype(np.float32), s, None, 1)
    moved = raw != q
    frac = float(moved.mean())
    print(f"float16(W): {moved.sum()} of {q.size} INT8 values move ({100 * frac:.3f} %), "
          f"max |step| {int(np.abs(raw.astype(np.int16) - q).max())}")
    assert 0 < frac < 0.02 and np.abs(raw.astype(np.int16) - q).max() == 1


def test_a_weight_float16_cannot_carry_stays_float32():
    """Tiny scales put q·s among float16 subnormals, which round coarser: such a weight is left in float32."""
    w = (np.random.default_rng(0).standard_normal((64, 32)) * 1e-6).astype(np.float32)
    s = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    assert fp16_weight(w, s, None, 1) is None


def _qdq_graph(w, s, zp=None):
    """A one-weight graph: constant W -> QuantizeLinear(s[, zp], axis 1) -> DequantizeLinear -> MatMul."""
    import onnx_ir as ir

    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, w.shape[0]]))
    wv = ir.val("w", const_value=ir.tensor(w, name="w"))
    sv = ir.val("s", const_value=ir.tensor(s, name="s"))
    ins = [wv, sv] + ([ir.val("zp", const_value=ir.tensor(zp, name="zp"))] if zp is not None else [])
    q = ir.node("QuantizeLinear", ins, attributes={"axis": 1}, name="q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], sv] + ins[2:], attributes={"axis": 1}, name="dq")
    mm = ir.node("MatMul", [x, dq.outputs[0]], name="mm")
    mm.outputs[0].name = "y"
    g = ir.Graph([x], [mm.outputs[0]], nodes=[q, dq, mm], initializers=ins, opset_imports={"": 17})
    return ir.Model(g, ir_version=8)


def test_qdq16_weights_are_computed_when_written_where_the_scales_prove_them():
    """Scales that guarantee normal float16 values (s >= 2^-14, 128 s <= 65504, zero-point 0): the pass stores a
    LazyTensor (nothing weight-sized allocated by the pass), whose value is the verified float16(q·s); scales that
    do not: the eager, verified path (and float32 kept where float16 would move a value)."""
    import onnx_ir as ir

    from sq_export.passes.weights_fp16 import WeightsToFp16Pass, scales_guarantee_exact

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 32)) * 0.02).astype(np.float32)
    s = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    assert scales_guarantee_exact(s, None) and scales_guarantee_exact(s, np.zeros(32, np.int8))
    assert not scales_guarantee_exact(s, np.ones(32, np.int8))
    assert not scales_guarantee_exact(np.full(32, 2.0**-15, np.float32), None)  # subnormal products possible
    assert not scales_guarantee_exact(np.full(32, 600.0, np.float32), None)  # 128 s > 65504
    m = _qdq_graph(w, s)
    p = WeightsToFp16Pass()
    p(m)
    assert (p.count, p.kept_float32) == (1, 0)
    (t,) = [v.const_value for v in m.graph.initializers.values() if v.name.endswith(".fp16")]
    assert isinstance(t, ir.LazyTensor)
    assert np.array_equal(t.numpy(), fp16_weight(w, s, None, 1))  # = the verified value
    # tiny scales: verified eagerly, and kept float32 since float16 would move INT8 values
    w2 = (rng.standard_normal((64, 32)) * 1e-6).astype(np.float32)
    m2 = _qdq_graph(w2, (np.abs(w2).max(axis=0) / 127.0).astype(np.float32))
    p2 = WeightsToFp16Pass()
    p2(m2)
    assert (p2.count, p2.kept_float32) == (0, 1)
