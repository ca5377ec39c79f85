"""`export --quantize-lm-head`: the LM head as one more W8A8 QLinear (opt-in), stored once as INT8, checked clean,
fused by ONNX Runtime into an integer kernel with `--target ort`."""

import collections
import json

import numpy as np
import onnx
import pytest

from conftest import FAMILIES, save_tiny
from sq_export.passes.check import run_check
from sq_export.cli import main
from sq_export.onnxio.meta import read_metadata

CAL = ["--samples", "2", "--calib-seq-len", "32"]


def _optimized(path, tmp_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gemma3"])
def test_quantized_lm_head_is_one_int8_copy_and_fused_on_ort(family, tmp_path, capsys):
    d = tmp_path / "tiny"
    model, _ = save_tiny(family, d)
    vocab, hidden = model.config.vocab_size, model.get_input_embeddings().weight.shape[1]
    base, head = tmp_path / "sq.onnx", tmp_path / "sq_head.onnx"
    for out, extra in ((base, []), (head, ["--quantize-lm-head"])):
        assert main(["-q", "export", str(d), *CAL, "--target", "ort", "-o", str(out), *extra]) == 0
    capsys.readouterr()
    rep = run_check(str(head), target="ort")
    assert rep.ok, rep.format_text()
    s0, s1 = run_check(str(base), target="ort").summary, rep.summary
    assert s1["matmul_quantized"] == s0["matmul_quantized"] + 1 and s1["matmul_float"] == s0["matmul_float"] - 1
    g = onnx.load(str(head))
    shapes = collections.Counter(tuple(i.dims) for i in g.graph.initializer)
    int8_head = [i for i in g.graph.initializer if i.data_type == onnx.TensorProto.INT8 and tuple(i.dims) == (hidden, vocab)]
    assert len(int8_head) == 1
    # no float copy of the head: only the embedding's own [vocab, hidden] table
    assert shapes[(hidden, vocab)] == 1 and shapes[(vocab, hidden)] == 1
    assert read_metadata(head)["quantize_lm_head"] == "lm_head"
    assert head.stat().st_size < base.stat().st_size
    # ONNX Runtime runs the head as one more integer kernel, and the float MatMul of the head is gone (OPT's 2-D
    # fc1/fc2 MatMul+Add become a float Gemm before ORT's Q/DQ fusion sees them, with or without the head)
    ops0, ops1 = (collections.Counter(n.op_type for n in _optimized(p, tmp_path).graph.node) for p in (base, head))
    assert ops1["MatMulIntegerToFloat"] == ops0["MatMulIntegerToFloat"] + 1
    assert ops1["MatMul"] == ops0["MatMul"] - 1 and ops1["DequantizeLinear"] == ops0["DequantizeLinear"]
    # perplexity stays finite and close to the float-head graph's on this random tiny model
    ppl = []
    for p in (base, head):
        assert main(["-q", "eval", str(p), "--seq-len", "64", "--max-tokens", "512", "--json"]) == 0
        ppl.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"])
    assert np.isfinite(ppl[1]) and abs(ppl[1] / ppl[0] - 1) < 0.05, ppl


def test_quantize_lm_head_refused_for_fp(tmp_path, capsys):
    d = tmp_path / "tiny"
    save_tiny("llama", d)
    rc = main(["-q", "export", str(d), "--mode", "fp", "--quantize-lm-head", "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "--quantize-lm-head" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_scale_is_the_heads_input_range(family):
    """The base model's last hidden state is the head's input in every family (final norm, OPT's project_out)."""
    import torch

    from conftest import make_tiny, token_batches
    from sq_export.quant.lm_head import quantize_lm_head
    from sq_export.quant.qlinear import QLinear, scale_from_amax

    model, _ = make_tiny(family)
    ids = token_batches(n=3, seq=16)
    seen = []
    h = model.get_output_embeddings().register_forward_pre_hook(lambda m, i: seen.append(i[0].abs().amax()))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids))
    h.remove()
    r = quantize_lm_head(model, ids, batch_size=2)
    assert isinstance(model.get_output_embeddings(), QLinear) or isinstance(model.get_submodule(r["name"]), QLinear)
    assert r["act_scale"] == pytest.approx(float(scale_from_amax(max(seen))), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_smoothing_is_exact_in_float(family):
    """Smoothing the head folds 1/s into the final norm and s into the head's own weight copy: float logits are
    unchanged, the input embedding is untouched."""
    import torch

    from conftest import make_tiny, token_batches
    from sq_export.quant.lm_head import quantize_lm_head

    model, fam = make_tiny(family)
    ids = torch.as_tensor(token_batches(n=2, seq=16))
    emb = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    r = quantize_lm_head(model, ids.numpy(), batch_size=2, alpha=0.5, norm_form=fam.norm_form)
    assert r["smoothed_into"] is not None
    q = model.get_submodule(r["name"])
    with torch.no_grad():
        h = model.base_model(input_ids=ids)[0]
        got = h @ q.w_kn + (q.bias if q.bias is not None else 0)
    assert torch.allclose(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
    assert torch.equal(model.get_input_embeddings().weight, emb)
