"""--quantize-attention: Q/DQ on both inputs of both attention MatMuls (q·kᵀ, P·v), lint-clean, ORT == PyTorch."""

import numpy as np
import onnx
import pytest

from conftest import FAMILIES, token_batches
from sq_export.quant import attention as A
from sq_export.passes.check import run_check
from sq_export.export.exporter import export_onnx
from sq_export.onnxio.meta import read_metadata
from test_export import _ort_logits, _quantized, _torch_logits


def _attention_matmuls(g):
    """MatMuls whose two inputs are both DequantizeLinear of activations (not weights)."""
    inits = {i.name for i in g.graph.initializer}
    prod = {o: n for n in g.graph.node for o in n.output}

    def act_dq(t):
        n = prod.get(t)
        if n is None or n.op_type != "DequantizeLinear":
            return False
        src = prod.get(n.input[0])
        return n.input[0] not in inits and not (src is not None and src.op_type == "QuantizeLinear" and src.input[0] in inits)

    mm = [n for n in g.graph.node if n.op_type == "MatMul"]
    return [n for n in mm if act_dq(n.input[0]) and act_dq(n.input[1])], mm


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_qdq_exported_lint_clean_and_matches(family, tmp_path):
    model, fam = _quantized(family)
    scales = A.quantize_attention(model, fam, token_batches(n=4))
    assert len(scales) == fam.num_layers() and all(s["p"] == pytest.approx(1 / 127) for s in scales.values())
    p = tmp_path / "m.onnx"
    export_onnx(model, fam, p, weights="qdq" if family in ("opt", "gpt2") else "int8", meta={"mode": "sq", "quantize_attention": "static"})
    rep = run_check(str(p))
    assert rep.ok, rep.format_text()
    g = onnx.load(str(p))
    attn_mm, _ = _attention_matmuls(g)
    assert len(attn_mm) == 2 * fam.num_layers()
    ids = token_batches(n=2, seq=20, seed=3)
    ref, got = _torch_logits(model, ids), _ort_logits(p, ids)
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert np.mean(np.abs(got - ref)) < 1e-3 * np.abs(ref).max()
    assert read_metadata(p)["quantize_attention"] == "static"


def test_attention_quant_off_is_exact_and_cost_is_small():
    """Calibration mode computes exactly the eager attention; the quantized attention costs little over W8A8."""
    ids = token_batches(n=2, seq=24, seed=5)
    fp = _torch_logits(_quantized("llama", "fp")[0], ids)
    model, fam = _quantized("llama")
    base = _torch_logits(model, ids)
    scales = A.calibrate_attention(model, fam, token_batches(n=8))
    assert np.array_equal(_torch_logits(model, ids), base)  # installed, not quantizing: same numbers
    A.enable_attention_quant(model, scales, fam)
    q = _torch_logits(model, ids)
    rel = lambda x: np.abs(x - fp).mean() / np.abs(fp).mean()  # noqa: E731
    assert not np.array_equal(q, base)
    assert rel(q) < 1.5 * rel(base) + 0.05, (rel(q), rel(base))
    assert (q.argmax(-1) == fp.argmax(-1)).mean() > 0.7
