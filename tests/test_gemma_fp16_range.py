"""Gemma-3's exported graph stays inside FP16's range (issue 16): the residual stream is exported divided by 4
(families/gemma3.residual_scaled), exactly — the logits of the float32 graph are bit-identical — while a massive
activation that drives the stream over 65,504 in the graph exported without the patch stays below it with it."""

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from conftest import make_tiny
from sq_export.export.exporter import export_onnx
from sq_export.families import gemma3

ort = pytest.importorskip("onnxruntime")
FP16_MAX = 65504.0
IDS = np.array([[1, 3, 4, 5, 2, 8, 7, 6]], np.int64)


def _massive_gemma(value=1.0e4):
    """Tiny Gemma-3 whose embedding has one channel at `value` for a few tokens (× sqrt(hidden) = 8: the stream
    reaches 8·value), the LM head untied so the logits stay small."""
    model, fam = make_tiny("gemma3")
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.get_input_embeddings().weight[3:9, 5] = value
    return model, fam


def _logits_and_max(path, node_filter):
    """The logits and the max |x| over the outputs of the nodes `node_filter(name)` selects, in ONNX Runtime."""
    m = onnx.load(path)
    outs = [o for n in m.graph.node if node_filter(n.name) for o in n.output]
    assert outs
    for o in outs:
        m.graph.output.append(helper.make_empty_tensor_value_info(o))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": IDS, "attention_mask": np.ones_like(IDS)})
    return out[0], max(float(np.abs(o).max()) for o in out[1:]), len(outs)


def _logits_and_stream(path):
    """The logits and max |x| of the residual stream (every decoder layer's two residual adds) in ONNX Runtime."""
    logits, mx, n = _logits_and_max(path, lambda name: re.search(r"layers\.\d+/Add(_1)?$", name))
    assert n == 2 * 2  # two layers, two residual adds each
    return logits, mx


def test_residual_stream_exported_divided_by_four_exactly(tmp_path, monkeypatch):
    model, fam = _massive_gemma()
    assert gemma3.residual_scaled in type(fam).export_patches
    export_onnx(model, fam, tmp_path / "scaled.onnx", weights="qdq")
    monkeypatch.setattr(type(fam), "export_patches", ())
    export_onnx(model, fam, tmp_path / "plain.onnx", weights="qdq")
    plain, plain_max = _logits_and_stream(tmp_path / "plain.onnx")
    scaled, scaled_max = _logits_and_stream(tmp_path / "scaled.onnx")
    assert plain_max > FP16_MAX  # the overflow an FP16 engine meets
    assert scaled_max < FP16_MAX / 3
    assert scaled_max == pytest.approx(plain_max / 4, rel=1e-6)
    np.testing.assert_array_equal(scaled, plain)  # powers of two: the same bits
    with torch.no_grad():  # and the model in torch, after the export, is the model before it
        ref = model(input_ids=torch.as_tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(plain, ref, rtol=1e-4, atol=1e-5)


def test_patch_restores_the_model():
    model, fam = make_tiny("gemma3")
    base = model.model
    eps = [m.eps for m in model.modules() if type(m).__name__ == "Gemma3RMSNorm"]
    x = torch.as_tensor(IDS)
    q_eps = base.layers[0].self_attn.q_norm.eps
    with torch.no_grad():
        before = model(input_ids=x).logits
        with gemma3.residual_scaled(model):
            assert base.norm.eps == eps[-1] / 16 and base.layers[0].input_layernorm.eps == eps[0] / 16
            assert base.layers[0].self_attn.q_norm.eps == q_eps  # per-head norms do not read the stream
            assert float(base.embed_tokens(x).abs().max()) < float(base.embed_tokens.weight.abs().max() * base.embed_tokens.embed_scale) / 3
            during = model(input_ids=x).logits
        after = model(input_ids=x).logits
    assert [m.eps for m in model.modules() if type(m).__name__ == "Gemma3RMSNorm"] == eps
    assert not base.embed_tokens._forward_hooks and not base.layers[0].post_attention_layernorm._forward_hooks
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, before)
    with gemma3.residual_scaled(model, shift=0):  # shift 0: nothing changes
        assert not base.embed_tokens._forward_hooks and base.norm.eps == eps[-1]


def _act_max(path):
    """Logits and max |x| over every node output of the MLPs' activation (act_fn) in ONNX Runtime."""
    logits, mx, _ = _logits_and_max(path, lambda name: "/act_fn/" in name)
    return logits, mx


def test_gelu_cube_on_clipped_input(tmp_path, monkeypatch):
    """A gate projection reaching |x| ~ 100 (Gemma-3-270m's: 68) puts x³ ~ 1e6 in the exported GELU; with the
    patch the largest value of the activation is of the order of |x|, and the logits keep every bit."""
    model, fam = make_tiny("gemma3")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(400.0)
    export_onnx(model, fam, tmp_path / "clipped.onnx", weights="qdq")
    monkeypatch.setattr(type(fam), "export_patches", (gemma3.residual_scaled,))
    export_onnx(model, fam, tmp_path / "plain.onnx", weights="qdq")
    plain, plain_max = _act_max(tmp_path / "plain.onnx")
    clipped, clipped_max = _act_max(tmp_path / "clipped.onnx")
    with torch.no_grad():
        gate = model.model.layers[0].mlp.gate_proj(model.model.layers[0].pre_feedforward_layernorm(
            model.model.embed_tokens(torch.as_tensor(IDS)))).abs().max().item()
    assert gate ** 3 > FP16_MAX and plain_max > FP16_MAX  # the cube overflows FP16
    assert clipped_max <= 2 * gate * 1.001 < FP16_MAX
    np.testing.assert_array_equal(clipped, plain)
    # the model's own activation is back
    assert all(m.act is not None and getattr(m.act, "func", None) is torch.nn.functional.gelu
               for m in model.modules() if type(m).__name__ == "GELUTanh")
