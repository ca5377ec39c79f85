"""Decode graph (--decode): KV-cache I/O for every family, ORT greedy == PyTorch greedy (float and W8A8), only
TensorRT 8.6 ops, and the `generate` command over both backends."""

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import FAMILIES, make_tiny, token_batches
from sq_export import attention as A
from sq_export.check import run_check
from sq_export.cli import main
from sq_export.decode import export_decode_onnx, greedy_onnx, greedy_torch, position_ids_for, token_agreement
from sq_export.evaluate import ort_session
from sq_export.export import read_metadata
from test_export import _quantized

# ONNX ops TensorRT 8.6's ONNX parser supports that this exporter emits (onnx-tensorrt 8.6 operators.md)
TRT86_OPS = {
    "Add", "And", "Cast", "Concat", "Constant", "ConstantOfShape", "CumSum", "DequantizeLinear", "Div", "Equal", "Erf",
    "Expand", "Flatten", "Gather", "Gemm", "Identity", "LayerNormalization", "Less", "LessOrEqual", "MatMul", "Mul",
    "Neg", "Not", "Pow", "QuantizeLinear", "Range", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Sin", "Cos",
    "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where", "Greater", "Or",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_float_decode_graph_equals_pytorch_greedy(family, tmp_path):
    model, fam = make_tiny(family, outliers=False)
    p = tmp_path / "dec.onnx"
    r = export_decode_onnx(model, fam, p, meta={"mode": "fp"})
    n = fam.num_layers()
    assert r["decode_num_layers"] == n
    sess = ort_session(p)
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and len(names) == 3 + 2 * n
    assert [o.name for o in sess.get_outputs()][1:3] == ["present.0.key", "present.0.value"]
    ops = {x.op_type for x in onnx.load(str(p)).graph.node}
    assert ops <= TRT86_OPS, ops - TRT86_OPS
    ids = token_batches(n=2, seq=6, seed=7)
    a, b = greedy_torch(model, ids, 8), greedy_onnx(sess, ids, 8)
    assert a.shape == (2, 8) and np.array_equal(a, b), (a, b)
    # prefill (past 0) then one cached step == the full sequence without a cache
    full = np.concatenate([ids, a[:, :1]], axis=1)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(full), attention_mask=torch.ones(full.shape, dtype=torch.long)).logits.numpy()
    outs = [o.name for o in sess.get_outputs()]
    kvh, hd = r["decode_kv_heads"], r["decode_head_dim"]
    empty = {f"past_key_values.{i}.{kv}": np.zeros((2, kvh, 0, hd), np.float32) for i in range(n) for kv in ("key", "value")}
    m0 = np.ones_like(ids)
    res = sess.run(outs, {"input_ids": ids, "attention_mask": m0, "position_ids": position_ids_for(m0, 6), **empty})
    past = {k.replace("present.", "past_key_values."): v for k, v in zip(outs[1:], res[1:])}
    assert res[1].shape == (2, kvh, 6, hd)
    m1 = np.ones_like(full)
    step = sess.run(["logits"], {"input_ids": full[:, -1:], "attention_mask": m1, "position_ids": position_ids_for(m1, 1), **past})[0]
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(res[0] - ref[:, :6]).max() < tol and np.abs(step[:, 0] - ref[:, 6]).max() < tol


@pytest.mark.parametrize("family", ["llama", "bloom", "opt"])
def test_quantized_decode_graph_agrees_with_fake_quant(family, tmp_path):
    model, fam = _quantized(family)
    A.quantize_attention(model, fam, token_batches(n=4))
    p = tmp_path / "dec.onnx"
    export_decode_onnx(model, fam, p, weights="qdq", meta={"mode": "sq", "quantize_attention": "static"})
    assert run_check(str(p)).ok
    assert {x.op_type for x in onnx.load(str(p)).graph.node} <= TRT86_OPS
    ids = token_batches(n=2, seq=6, seed=8)
    a, b = greedy_torch(model, ids, 8), greedy_onnx(ort_session(p), ids, 8)
    assert (a == b).mean() >= 0.9, (a, b)  # same INT8 grid; only a rare float-order rounding tie may differ


def test_token_agreement_reports():
    model, _ = make_tiny("gpt2", outliers=False)
    prompts = list(token_batches(n=3, seq=5, seed=9))
    r = token_agreement(model, model, prompts, 4)
    assert r["token_agreement_pct"] == 100.0 and r["exact_match_prompts"] == 3 and r["mean_common_prefix"] == 4


def test_cli_export_decode_and_generate(tiny_dirs, small_text, tmp_path, capsys):
    d = tiny_dirs("llama")
    cal = ["--calib-text", str(small_text / "calib.txt"), "--samples", "4", "--calib-seq-len", "32"]
    out = tmp_path / "dec.onnx"
    assert main(["-q", "export", str(d), "--decode", "--quantize-attention", "--weights", "qdq", *cal, "-o", str(out), "--json"]) == 0
    exp = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exp["graph"] == "decode"
    meta = read_metadata(out)
    assert meta["graph"] == "decode" and meta["quantize_attention"] == "static"
    assert main(["-q", "generate", str(out), "--prompt", "The history of", "--max-new-tokens", "6", "--json"]) == 0
    onnx_res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["-q", "generate", str(d), "--mode", "sq", "--quantize-attention", *cal, "--prompt", "The history of", "--max-new-tokens", "6", "--json"]) == 0
    torch_res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert onnx_res["backend"] == "onnxruntime" and torch_res["backend"] == "pytorch"
    assert len(onnx_res["tokens"]) == len(torch_res["tokens"]) >= 1
    assert np.mean(np.array(onnx_res["tokens"][:len(torch_res["tokens"])]) == np.array(torch_res["tokens"])) >= 0.8
