"""Decode graph (--decode): KV-cache I/O for every family, ORT greedy == PyTorch greedy (float and W8A8), only
TensorRT 8.6 ops, and the `generate` command over both backends."""

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import FAMILIES, make_tiny, token_batches
from sq_export.quant import attention as A
from sq_export.passes.check import run_check
from sq_export.cli import main
from sq_export.export.decode import export_decode_onnx
from sq_export.kvcache import position_ids_for
from sq_export.measure.generate import greedy_onnx, greedy_torch, token_agreement
from sq_export.measure.perplexity import ort_session
from sq_export.onnxio.meta import read_metadata
from test_export import _quantized

# ONNX ops TensorRT 8.6's ONNX parser supports that this exporter emits (onnx-tensorrt 8.6 operators.md)
TRT86_OPS = {
    "Add", "And", "Cast", "Concat", "Constant", "ConstantOfShape", "CumSum", "DequantizeLinear", "Div", "Equal", "Erf",
    "Expand", "Flatten", "Gather", "Gemm", "Identity", "LayerNormalization", "Less", "LessOrEqual", "MatMul", "Mul",
    "Neg", "Not", "Pow", "QuantizeLinear", "Range", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Sin", "Cos",
    "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where", "Greater", "Or",
    "Clip",  # constant min/max (Gemma-3's GELU cube on clipped x, families/gemma3.py)
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
    # a masked zero cache slot in front (how TensorRT engines with past length >= 1 start) changes no token
    assert np.array_equal(a, greedy_onnx(sess, ids, 8, pad_slots=1))
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


@pytest.mark.parametrize("family", ["llama", "bloom", "opt", "gemma3", "phi3", "gpt_neox"])
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


def test_decode_fixtures_are_current():
    """graphs/decode_llama_* (tests/fixtures/make_decode_fixtures.py) feed the TensorRT decode tests on the GPU machine;
    ONNX Runtime must still produce the tokens stored with them, with and without a masked pad slot."""
    from pathlib import Path

    g = Path(__file__).resolve().parent / "fixtures" / "graphs"
    d = np.load(g / "decode_llama.npz")
    for kind in ("fp", "sq"):
        sess = ort_session(g / f"decode_llama_{kind}.onnx")
        n = d[f"ort_{kind}"].shape[1]
        for pad in (0, 1):
            got = np.concatenate([greedy_onnx(sess, p[None], n, pad_slots=pad) for p in d["prompts"]])
            assert np.array_equal(got, d[f"ort_{kind}"]), (kind, pad)
    assert np.array_equal(d["ort_fp"], d["reference"])  # the float graph reproduces PyTorch's greedy tokens


def test_cli_prompts_file_and_agreement(tiny_dirs, tmp_path, capsys):
    d = tiny_dirs("llama")
    prompts = tmp_path / "prompts.npz"
    assert main(["-q", "tokens", str(d), "--prompts", "3", "--prompt-tokens", "8", "--reference-tokens", "5", "-o", str(prompts)]) == 0
    z = np.load(prompts)
    assert z["prompts"].shape == (3, 8) and z["reference"].shape == (3, 5)
    dec = tmp_path / "dec.onnx"
    assert main(["-q", "export", str(d), "--mode", "fp", "--decode", "-o", str(dec)]) == 0
    capsys.readouterr()
    assert main(["-q", "generate", str(dec), "--prompts-file", str(prompts), "--max-new-tokens", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["backend"] == "onnxruntime" and len(res["tokens"]) == 3
    assert res["agreement_with_reference"]["token_agreement_pct"] == 100.0  # float ONNX decode == PyTorch
    # bad inputs: one line, exit 2, nothing written
    assert main(["-q", "tokens", str(d), "--reference-tokens", "5", "-o", str(tmp_path / "x.npz")]) == 2
    assert not (tmp_path / "x.npz").exists()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert main(["-q", "generate", str(dec), "--prompts-file", str(bad)]) == 2
    assert "not a readable .npz" in capsys.readouterr().err


def test_tokens_from_a_tokenizer_folder(tiny_dirs, tmp_path):
    """A tokenizer saved on its own (no config.json: e.g. made where transformers converts a GGUF's tokenizer as
    intended, carried to a machine whose transformers does not) tokenizes as its model folder does; a folder with
    neither a model nor a tokenizer is still refused in one line."""
    from sq_export.modeling import load_tokenizer

    d = tiny_dirs("llama")
    only = tmp_path / "tok"
    load_tokenizer(str(d)).save_pretrained(only)
    assert not (only / "config.json").exists()
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["-q", "tokens", str(d), "--seq-len", "32", "--max-tokens", "128", "-o", str(a)]) == 0
    assert main(["-q", "tokens", str(only), "--seq-len", "32", "--max-tokens", "128", "-o", str(b)]) == 0
    assert np.array_equal(np.load(a)["input_ids"], np.load(b)["input_ids"])
    (tmp_path / "empty").mkdir()
    assert main(["-q", "tokens", str(tmp_path / "empty"), "-o", str(tmp_path / "c.npz")]) == 2


def test_a_gguf_tokenizer_that_drops_its_bos_is_refused(tmp_path):
    """A GGUF that says to add BOS, and a tokenizer conversion that does not (transformers 5.17 on Gemma-3): refused in
    one line naming the way out; with the BOS, or a GGUF that does not ask for it, accepted."""
    import gguf

    from sq_export.errors import BadInput
    from sq_export.modeling import check_gguf_tokenizer, gguf_add_bos

    def write(path, add_bos):
        w = gguf.GGUFWriter(str(path), "llama")
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    class _Tok:
        bos_token_id = 2

        def __init__(self, first):
            self.first = first

        def __call__(self, text):
            return {"input_ids": [self.first, 651]}

    asks = write(tmp_path / "bos.gguf", True)
    assert gguf_add_bos(asks) is True and gguf_add_bos(write(tmp_path / "nobos.gguf", False)) is False
    assert gguf_add_bos(write(tmp_path / "silent.gguf", None)) is None
    check_gguf_tokenizer(_Tok(2), asks)
    with pytest.raises(BadInput, match="without the BOS token the file asks for.*--tokenizer DIR"):
        check_gguf_tokenizer(_Tok(651), asks)
    check_gguf_tokenizer(_Tok(651), tmp_path / "nobos.gguf")
    check_gguf_tokenizer(_Tok(651), tmp_path / "silent.gguf")
