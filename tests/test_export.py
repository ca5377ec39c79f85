"""ONNX export of every family: Q/DQ placement passes the graph check, ONNX Runtime computes what the PyTorch
fake quantization computes, the file is deterministic, and the float graph equals PyTorch."""

import numpy as np
import onnx
import pytest
import torch

from conftest import FAMILIES, make_tiny, token_batches
from sq_export.quant.calibrate import calibrate
from sq_export.passes.check import run_check
from sq_export.measure.perplexity import ort_session
from sq_export.export.exporter import export_onnx
from sq_export.onnxio.meta import read_metadata
from sq_export.quant.qlinear import quantize_model, static_scales
from sq_export.quant.smooth import apply_smoothing, smoothed_act_max


def _quantized(family, mode="sq"):
    model, fam = make_tiny(family)
    batches = token_batches()
    am = calibrate(model, fam, batches)
    if mode == "sq":
        am = smoothed_act_max(am, fam, apply_smoothing(model, fam, am, fam.default_alpha))
    names = fam.quantized_linears()
    if mode != "fp":
        quantize_model(model, names, "static", static_scales(am, names))
    return model, fam


def _ort_logits(path, ids):
    s = ort_session(path)
    return s.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def _torch_logits(model, ids):
    with torch.no_grad():
        x = torch.as_tensor(ids)
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("weights", ["int8", "qdq"])
def test_sq_export_checks_clean_and_matches_fake_quant(family, weights, tmp_path):
    model, fam = _quantized(family)
    p = tmp_path / "m.onnx"
    export_onnx(model, fam, p, weights=weights, meta={"mode": "sq"})
    onnx.checker.check_model(str(p), full_check=True)
    rep = run_check(str(p))
    assert rep.ok, rep.format_text()
    g = onnx.load(str(p))
    ops = [n.op_type for n in g.graph.node]
    n_lin = len(fam.quantized_linears())
    # one DQ per weight plus one per distinct activation tensor (q/k/v and gate/up share theirs)
    n_act = n_lin - sum(len(gr.linears) - 1 for gr in fam.groups())
    assert ops.count("DequantizeLinear") == n_lin + n_act
    assert ops.count("QuantizeLinear") == n_act + (n_lin if weights == "qdq" else 0)
    int8_inits = [i for i in g.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_inits) == (n_lin if weights == "int8" else 0)
    if fam.name in ("opt", "bloom", "gpt2"):
        assert "LayerNormalization" in ops and "ReduceMean" not in ops
    ids = token_batches(n=2, seq=24, seed=3)
    ref = _torch_logits(model, ids)
    got = _ort_logits(p, ids)
    # same INT8 grid and rounding: only float-order differences (and the rare rounding tie they flip)
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert np.mean(np.abs(got - ref)) < 1e-3 * np.abs(ref).max()
    assert read_metadata(p)["weights"] == weights


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fp_export_equals_pytorch_and_int8_weights_halve_size(family, tmp_path):
    model, fam = _quantized(family, "fp")
    export_onnx(model, fam, tmp_path / "fp.onnx")
    ids = token_batches(n=2, seq=24, seed=4)
    ref = _torch_logits(model, ids)
    assert np.abs(_ort_logits(tmp_path / "fp.onnx", ids) - ref).max() < 1e-4 * max(1, np.abs(ref).max())
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "fp.onnx")).graph.node)


def test_export_is_byte_identical(tmp_path):
    paths = []
    for i in range(2):
        model, fam = _quantized("llama")
        paths.append(tmp_path / f"m{i}.onnx")
        export_onnx(model, fam, paths[-1], meta={"mode": "sq"})
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_ort_target_same_numbers(tmp_path):
    model, fam = _quantized("opt")
    export_onnx(model, fam, tmp_path / "trt.onnx")
    export_onnx(model, fam, tmp_path / "ort.onnx", target="ort")
    ids = token_batches(n=2, seq=16, seed=5)
    a, b = _ort_logits(tmp_path / "trt.onnx", ids), _ort_logits(tmp_path / "ort.onnx", ids)
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    assert run_check(str(tmp_path / "ort.onnx"), target="ort").ok


def test_dynamic_shapes(tmp_path):
    model, fam = _quantized("gpt2")
    export_onnx(model, fam, tmp_path / "m.onnx")
    for b, s in ((1, 5), (3, 40)):
        ids = token_batches(n=b, seq=s, seed=b)
        assert _ort_logits(tmp_path / "m.onnx", ids).shape == (b, s, 256)


def test_qdq_constants_are_tidy_for_tensorrt(tmp_path):
    """TensorRT 8.6 refuses an int8 zero-point feeding Identity nodes (seen on the H100 with SmolLM2)."""
    model, fam = _quantized("llama")
    export_onnx(model, fam, tmp_path / "m.onnx", weights="qdq")
    g = onnx.load(str(tmp_path / "m.onnx"))
    consumers = {}
    for n in g.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    int8 = {i.name for i in g.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert int8 and all(consumers.get(name) in (["QuantizeLinear"], ["DequantizeLinear"]) for name in int8)
    init_names = {i.name for i in g.graph.initializer}
    assert not any(n.op_type == "Identity" and n.input[0] in init_names for n in g.graph.node)


def test_compare_cli_with_text_on_real_exports(tmp_path, capsys):
    """`sq-export compare A.onnx B.onnx --text FILE`: tokenized with the recorded source model's tokenizer."""
    import json as _json

    from conftest import save_tiny
    from sq_export.cli import main

    d = tmp_path / "tiny"
    save_tiny("llama", d)
    for mode in ("fp", "sq"):
        assert main(["-q", "export", str(d), "--mode", mode, "--samples", "2", "--calib-seq-len", "32", "-o", str(tmp_path / f"{mode}.onnx")]) == 0
    capsys.readouterr()
    rc = main(["-q", "compare", str(tmp_path / "fp.onnx"), str(tmp_path / "sq.onnx"), "--seq-len", "64", "--max-tokens", "256", "--perplexity", "--min-cosine", "0.5", "--min-top1", "0.5", "--json"])
    out = capsys.readouterr().out
    rep = _json.loads(out.strip().splitlines()[-1])
    assert rc == 0, out
    assert "sq.onnx" in _json.dumps(rep) and "perplexity" in _json.dumps(rep)


@pytest.mark.parametrize("weights", ["int8", "qdq"])
def test_no_unused_initializers(weights, tmp_path):
    model, fam = _quantized("llama")
    export_onnx(model, fam, tmp_path / "m.onnx", weights=weights)
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    used = {i for n in g.node for i in n.input}
    assert [t.name for t in g.initializer if t.name not in used] == []
