"""TensorRT build plans per version (pure functions: no TensorRT, no GPU)."""

from __future__ import annotations

import pytest

from sq_export.engine.trt_compat import GraphFacts, graph_facts, parse_version, plan_build
from sq_export.errors import BackendMissing, BadInput

INPUTS = {"input_ids": "INT64", "attention_mask": "INT64"}


def facts(qdq=True, int8_init=False, dtype="fp32", **kw):
    return GraphFacts(
        inputs=dict(INPUTS),
        input_shapes={k: ["batch", "seq"] for k in INPUTS},
        outputs={"logits": "FLOAT16" if dtype == "fp16" else "FLOAT"},
        n_quantize=4 if qdq else 0,
        n_dequantize=6 if qdq else 0,
        int8_weight_dq=("w0_q", "w1_q") if int8_init else (),
        float_dtype=dtype,
        qdq_scale_dtypes=("FLOAT",) if qdq else (),
        opset=17,
        **kw,
    )


def test_parse_version():
    assert parse_version("8.6.0") == (8, 6, 0)
    assert parse_version("10.3.0.26") == (10, 3, 0)
    assert parse_version("11.0.0.post1") == (11, 0, 0)
    assert parse_version("9.2") == (9, 2, 0)
    with pytest.raises(BadInput):
        parse_version("abc")


def test_trt86_int8_uses_int8_and_fp16_flags():
    p = plan_build("8.6.0", "int8", facts())
    assert not p.strongly_typed
    assert p.int8_flag and p.fp16_flag
    assert p.config_kwargs() == {"fp16": True, "int8": True}
    assert p.network_kwargs() == {}
    assert p.int64_inputs_become_int32
    assert any("INT32" in n for n in p.notes)


def test_trt86_refuses_int8_weight_initializers():
    with pytest.raises(BadInput, match="--weights qdq"):
        plan_build("8.6.0", "int8", facts(int8_init=True))


def test_trt86_fp16_from_fp32_graph():
    p = plan_build("8.6.0", "fp16", facts(qdq=False))
    assert p.fp16_flag and not p.int8_flag and not p.strongly_typed
    assert p.config_kwargs() == {"fp16": True}


def test_trt86_no_bf16():
    with pytest.raises(BadInput, match="BF16"):
        plan_build("8.6.0", "int8", facts(dtype="bf16"))


@pytest.mark.parametrize("version", ["10.0.1", "10.3.0.26", "11.0.0"])
def test_trt10_plus_strongly_typed_int8(version):
    p = plan_build(version, "int8", facts(int8_init=True, dtype="fp16"))
    assert p.strongly_typed
    assert not p.int8_flag and not p.fp16_flag
    assert p.config_kwargs() == {}
    assert p.network_kwargs() == {"strongly_typed": True}
    assert not p.int64_inputs_become_int32


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_trt10_plus_fp32_graph_is_said(version):
    p = plan_build(version, "int8", facts(dtype="fp32"))
    assert p.strongly_typed
    assert any("FP32" in n and "strongly typed" in n for n in p.notes)


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_trt10_plus_fp16_needs_fp16_graph(version):
    with pytest.raises(BadInput, match="--dtype fp16"):
        plan_build(version, "fp16", facts(qdq=False, dtype="fp32"))
    p = plan_build(version, "fp16", facts(qdq=False, dtype="fp16"))
    assert p.strongly_typed and p.config_kwargs() == {}


@pytest.mark.parametrize("version", ["8.6.0", "10.3.0", "11.0.0"])
def test_precision_must_match_graph(version):
    with pytest.raises(BadInput, match="no"):
        plan_build(version, "int8", facts(qdq=False))
    with pytest.raises(BadInput, match="--precision int8"):
        plan_build(version, "fp16", facts(qdq=True))
    with pytest.raises(BadInput):
        plan_build(version, "int4", facts())


def test_too_old_tensorrt():
    with pytest.raises(BackendMissing):
        plan_build("8.2.1", "int8", facts())


def test_graph_facts_from_files(tmp_path):
    from test_engine_models import tiny_lm

    f = graph_facts(tiny_lm(tmp_path / "q.onnx", quant=True))
    assert f.has_qdq and f.int8_weight_dq == () and f.float_dtype == "fp32"
    assert f.inputs == INPUTS and f.input_shapes["input_ids"] == ["batch", "seq"] and f.opset == 17
    f8 = graph_facts(tiny_lm(tmp_path / "q8.onnx", quant=True, weights="int8"))
    assert f8.int8_weight_dq == ("w_q",)
    with pytest.raises(BadInput, match="--weights qdq"):
        plan_build("8.6.0", "int8", f8)
    assert plan_build("10.3.0", "int8", f8).strongly_typed
    fh = graph_facts(tiny_lm(tmp_path / "h.onnx", dtype="fp16"))
    assert not fh.has_qdq and fh.float_dtype == "fp16" and fh.outputs["logits"] == "FLOAT16"


def test_graph_facts_bad_files(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        graph_facts(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not an onnx file at all" * 10)
    with pytest.raises(BadInput):
        graph_facts(junk)


def test_decode_profile_shapes_from_the_graph():
    """A decode graph's profile: tokens [b, s], attention_mask [b, past + s], cache [b, kv_heads, past, head_dim]
    with heads/head_dim read from the graph (no TensorRT needed)."""
    from pathlib import Path

    from sq_export.engine.build import check_range, profile_shapes
    from sq_export.engine.trt_compat import graph_facts
    from sq_export.errors import BadInput

    g = Path(__file__).resolve().parent / "fixtures" / "graphs"
    facts = graph_facts(g / "decode_llama_fp.onnx")
    shapes = profile_shapes(facts, (1, 2, 4), (1, 8, 16), (1, 16, 32))
    assert shapes["input_ids"] == ((1, 1), (2, 8), (4, 16)) and shapes["position_ids"] == shapes["input_ids"]
    assert shapes["attention_mask"] == ((1, 2), (2, 24), (4, 48))
    assert shapes["past_key_values.1.value"] == ((1, 2, 1, 16), (2, 2, 16, 16), (4, 2, 32, 16))
    assert len(shapes) == 3 + 2 * 2
    prefill = profile_shapes(graph_facts(g / "clean_rms.onnx"), (1, 1, 4), (1, 128, 512), None)
    assert set(prefill) == {"input_ids", "attention_mask"} and prefill["attention_mask"] == ((1, 1), (1, 128), (4, 512))
    with pytest.raises(BadInput, match="min <= opt <= max"):
        check_range((0, 16, 32), "past")


def test_no_fp16_keeps_float_layers_fp32_on_trt8_only():
    p = plan_build("8.6.0", "int8", facts(), fp16=False)
    assert p.int8_flag and not p.fp16_flag and p.config_kwargs() == {"int8": True}
    assert any("FP32" in n for n in p.notes)
    with pytest.raises(BadInput, match="--no-fp16"):
        plan_build("8.6.0", "fp16", facts(qdq=False), fp16=False)
    with pytest.raises(BadInput, match="strongly typed"):
        plan_build("10.3.0", "int8", facts(dtype="fp16"), fp16=False)


def test_graph_asks_int8_engines_without_fp16_flag():
    """A graph whose metadata says int8_fp16=0 (Gemma-3's exports) builds INT8 without the FP16 flag on 8.x unless
    --fp16 is given; the FP16 precision, TensorRT 10+ and graphs without the key keep today's flags."""
    off = facts(int8_fp16=False)
    p = plan_build("8.6.0", "int8", off)
    assert p.int8_flag and not p.fp16_flag and any("int8_fp16=0" in n for n in p.notes)
    assert plan_build("8.6.0", "int8", off, fp16=True).fp16_flag
    assert plan_build("8.6.0", "int8", facts()).fp16_flag and plan_build("8.6.0", "int8", facts(int8_fp16=True)).fp16_flag
    assert plan_build("10.3.0", "int8", facts(int8_fp16=False)).strongly_typed  # no flag there: no refusal either
    assert plan_build("8.6.0", "fp16", facts(qdq=False, int8_fp16=False)).fp16_flag


def test_fp16_export_graph_plans(tmp_path):
    """An `export --dtype fp16` graph: TensorRT 10+ builds it strongly typed in INT8; 8.6 refuses its float16
    Q/DQ scales with a re-export hint."""
    pytest.importorskip("torch", reason="exports a graph (torch); the TensorRT kit's Python has no torch")
    from conftest import make_tiny
    from sq_export.export.exporter import export_onnx
    from test_export import _quantized

    model, fam = _quantized("llama")
    export_onnx(model, fam, tmp_path / "m.onnx", dtype="fp16")
    f = graph_facts(str(tmp_path / "m.onnx"))
    assert f.float_dtype == "fp16" and f.qdq_scale_dtypes == ("FLOAT16",) and f.opset == 19
    p = plan_build("10.3.0", "int8", f)
    assert p.strongly_typed and p.network_kwargs() == {"strongly_typed": True}
    with pytest.raises(BadInput, match="FLOAT16 scales"):
        plan_build("8.6.0", "int8", f)
    m, fam = make_tiny("opt")
    export_onnx(m, fam, tmp_path / "fp.onnx", dtype="fp16")
    p = plan_build("10.3.0", "fp16", graph_facts(str(tmp_path / "fp.onnx")))
    assert p.strongly_typed
