"""`export --dtype fp16`: the float parts in float16, float16 Q/DQ at opset 19, norm statistics in float32; the
graph passes the checker and `sq-export check`, ONNX Runtime (CPU) runs it, and its perplexity is the float32
graph's within a fraction of a percent, for every family and both weight forms."""

import numpy as np
import onnx
import pytest
import torch

from conftest import FAMILIES, save_tiny, token_batches
from sq_export.passes.check import run_check
from sq_export.measure.perplexity import onnx_perplexity
from sq_export.export.exporter import export_onnx
from sq_export.onnxio.meta import read_metadata
from test_export import _ort_logits, _quantized

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def _types(model: onnx.ModelProto) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    t = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.output, *m.graph.input]}
    t.update({i.name: i.data_type for i in m.graph.initializer})
    return t


def _ppl(path, ids):
    return onnx_perplexity(str(path), ids.reshape(-1), seq_len=48)["perplexity"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("weights", ["int8", "qdq"])
def test_fp16_graph_checks_runs_and_matches_fp32_perplexity(family, weights, tmp_path):
    model, fam = _quantized(family)
    p16, p32 = tmp_path / "m16.onnx", tmp_path / "m32.onnx"
    export_onnx(model, fam, p16, weights=weights, dtype="fp16", meta={"mode": "sq"})
    export_onnx(model, fam, p32, weights=weights, meta={"mode": "sq"})
    onnx.checker.check_model(str(p16), full_check=True)
    rep = run_check(str(p16))
    assert rep.ok, rep.format_text()
    g = onnx.load(str(p16))
    assert {o.domain: o.version for o in g.opset_import}[""] == 19
    assert read_metadata(p16)["dtype"] == "fp16"
    assert g.graph.output[0].type.tensor_type.elem_type == F16
    # every float initializer is float16: weights left float, embeddings, γ/β, biases, every Q/DQ scale
    f32 = [i.name for i in g.graph.initializer if i.data_type in (F32, onnx.TensorProto.DOUBLE)]
    if fam.norm_form == "one_plus_gamma":  # Gemma's norms multiply by (1+γ) in float32 and cast after (HF's own)
        readers = lambda name: [u for u in g.graph.node if name in u.input]  # noqa: E731
        f32 = [x for x in f32 if not all(u.op_type == "Mul" and "norm/" in u.name for u in readers(x))]
    assert not f32
    t = _types(g)
    init = {i.name for i in g.graph.initializer}
    n_lin = len(fam.quantized_linears())
    for n in g.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert t[n.input[1]] == F16, n.name
            assert t[n.input[0] if n.op_type == "QuantizeLinear" else n.output[0]] == F16, n.name
        if n.op_type == "MatMul":
            assert t[n.input[0]] == F16 and t[n.input[1]] == F16, n.name
        if n.op_type == "LayerNormalization":  # float16 in and out, statistics in float32 (stash_type 1, default)
            assert t[n.input[0]] == F16 and all(a.i == 1 for a in n.attribute if a.name == "stash_type")
        if n.op_type == "Pow":  # RMSNorm's square (and GPT-2's gelu cube, float16 there)
            if fam.name in ("llama", "glm", "gemma3", "qwen3", "phi3"):
                assert t[n.input[0]] == F32, "RMSNorm's mean of squares must be computed in float32"
        if n.op_type == "Cast":  # no Cast left around a Q/DQ
            users = [u.op_type for u in g.graph.node if n.output[0] in u.input]
            # (but Gemma's norm ends in its own Cast to float16, HF's `.type_as(x)` after the float32 (1+γ) Mul)
            norm_out = fam.norm_form == "one_plus_gamma" and "norm/" in n.name and n.attribute[0].i == F16
            assert "QuantizeLinear" not in users or norm_out, n.name
    dq_on_weights = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and
                     (n.input[0] in init if weights == "int8" else any(q.output[0] == n.input[0] and q.input[0] in init
                                                                        for q in g.graph.node if q.op_type == "QuantizeLinear"))]
    assert len(dq_on_weights) == n_lin
    ids = token_batches(n=4, seq=48, seed=7)
    a, b = _ppl(p32, ids), _ppl(p16, ids)
    assert abs(b / a - 1) < 0.01, (a, b)
    la, lb = _ort_logits(p32, ids[:2]), _ort_logits(p16, ids[:2])
    assert lb.dtype == np.float16 and np.isfinite(lb).all()
    assert np.mean(np.abs(lb.astype(np.float32) - la)) < 2e-2 * np.abs(la).max()


def test_fp16_weight_grid_is_the_fake_quantization_grid(tmp_path):
    """INT8 weights come from the float32 weights with the float16-rounded scales the DQ uses; the model is float32
    with its own scales again after the export."""
    model, fam = _quantized("llama")
    q = model.get_submodule(fam.quantized_linears()[0])
    w_scale = q.w_scale.clone()
    export_onnx(model, fam, tmp_path / "m.onnx", dtype="fp16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(q.w_scale, w_scale) and q.w_kn.dtype == torch.float32
    g = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.graph.initializer}
    s16 = w_scale.numpy().astype(np.float16)
    dq = next(n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].ndim == 2 and inits[n.input[0]].shape == tuple(q.w_kn.shape))
    assert np.array_equal(inits[dq.input[1]], s16)
    expect = np.clip(np.rint(q.w_kn.numpy() / s16.astype(np.float32)), -128, 127).astype(np.int8)
    assert np.array_equal(inits[dq.input[0]], expect)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fp16_norms_do_not_overflow(family, tmp_path):
    """Residual stream far beyond float16's sqrt(max) (|x| ~ 5,000: x² = 2.5e7 > 65,504): float16 norm statistics
    would overflow to inf and zero the hidden state; the float16 graph matches the float32 graph."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from sq_export.families import family_for

    cfg = tiny_config(family)
    cfg.tie_word_embeddings = False  # large input embeddings, ordinary LM head (logits stay in float16's range)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    fam = family_for(model)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(5000.0 / emb.abs().max())
    export_onnx(model, fam, tmp_path / "fp32.onnx")
    export_onnx(model, fam, tmp_path / "fp16.onnx", dtype="fp16")
    ids = token_batches(n=2, seq=24, seed=1)
    a, b = _ort_logits(tmp_path / "fp32.onnx", ids), _ort_logits(tmp_path / "fp16.onnx", ids)
    assert np.isfinite(b).all()
    assert np.abs(b.astype(np.float32) - a).max() < 2e-2 * np.abs(a).max()


def test_fp16_export_is_byte_identical(tmp_path):
    paths = []
    for i in range(2):
        model, fam = _quantized("gpt2")
        paths.append(tmp_path / f"m{i}.onnx")
        export_onnx(model, fam, paths[-1], dtype="fp16", target="ort")
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_fp16_cli_export_check_eval(tmp_path, capsys):
    import json

    from sq_export.cli import main

    d = tmp_path / "tiny"
    save_tiny("opt", d)
    out = tmp_path / "m16.onnx"
    assert main(["-q", "export", str(d), "--dtype", "fp16", "--samples", "2", "--calib-seq-len", "32", "-o", str(out)]) == 0
    assert main(["-q", "check", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", str(out), "--seq-len", "64", "--max-tokens", "256", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["backend"] == "onnxruntime" and np.isfinite(rep["perplexity"])
    assert read_metadata(out)["dtype"] == "fp16"


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_check_flags_float16_norm_statistics(family, tmp_path):
    """FP16001: `check` refuses a float16 graph whose norm squares in float16 (or LayerNormalization stash_type 0)."""
    from sq_export.passes import norm_precision

    model, fam = _quantized(family)
    export_onnx(model, fam, tmp_path / "m.onnx", dtype="fp16")
    g = onnx.load(str(tmp_path / "m.onnx"))
    assert norm_precision(g) == []
    prod = {o: n for n in g.graph.node for o in n.output}
    changed = 0
    for n in g.graph.node:
        if n.op_type == "Pow" and n.input[0] in prod and prod[n.input[0]].op_type == "Cast":
            n.input[0] = prod[n.input[0]].input[0]  # square the float16 value itself
            changed += 1
        if n.op_type == "LayerNormalization":
            n.attribute.append(onnx.helper.make_attribute("stash_type", 0))
            changed += 1
    assert changed
    v = norm_precision(g)
    assert len(v) == changed and {x.rule for x in v} == {"FP16001"}


def test_unknown_dtype_is_bad_input(tmp_path):
    from sq_export.errors import BadInput

    model, fam = _quantized("gpt2", "fp")
    with pytest.raises(BadInput, match="--dtype bf16"):
        export_onnx(model, fam, tmp_path / "m.onnx", dtype="bf16")
    assert not list(tmp_path.iterdir())
