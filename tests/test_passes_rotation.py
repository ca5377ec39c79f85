"""The `rotation` graph check (ROT001–ROT003, sq_export/passes/rotation.py) on a tiny Llama exported with
`--rotate-down 32`: clean as exported (qdq and qdq16 weights, prefill and decode); a graph whose metadata asks for
other blocks, whose rotation block is not orthonormal, or whose rotation no longer feeds the QuantizeLinear is
caught; a graph without the metadata is not checked."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import sq_export as sq
from sq_export.passes.check import run_check

CAL = dict(samples=4, seq_len=32)


@pytest.fixture(scope="module")
def rotated(tiny_dirs, small_text, tmp_path_factory):
    model, tok = sq.load_model(tiny_dirs("llama"))
    calib = sq.calibrate(model, tok, small_text / "calib.txt", **CAL)
    qm = sq.quantize(model, calib, sq.Recipe(rotate_down=32, fallback="none"))
    d = tmp_path_factory.mktemp("rot")
    out = {}
    for name, kw in (("qdq", dict(weights="qdq")), ("qdq16", dict(weights="qdq16")), ("dec", dict(weights="qdq", decode=True))):
        out[name] = sq.export_onnx(qm, d / f"{name}.onnx", **kw).path
    return out


def _rules(path_or_model):
    return sorted({v.rule for v in run_check(path_or_model).violations})


def _set_meta(m, key, value):
    for p in m.metadata_props:
        if p.key == f"sq_export.{key}":
            p.value = value
    return m


def _rotation_inits(m):
    return [t for t in m.graph.initializer if list(t.dims) == [32, 32]]


def test_exported_rotated_graphs_pass(rotated):
    for name, path in rotated.items():
        assert _rules(path) == [], name


def test_wrong_block_metadata_is_rot001(rotated):
    m = _set_meta(onnx.load(str(rotated["qdq"])), "rotate_down", "16")
    assert _rules(m) == ["ROT001"]
    m = _set_meta(onnx.load(str(rotated["qdq"])), "rotate_down", "")  # no rotation declared: not checked
    assert _rules(m) == []


def test_non_orthonormal_block_is_rot002(rotated):
    m = onnx.load(str(rotated["qdq"]))
    inits = _rotation_inits(m)
    assert inits, "the rotation block is an initializer of the exported graph"
    a = numpy_helper.to_array(inits[0]).copy()
    a[0, 0] *= 2
    inits[0].CopyFrom(numpy_helper.from_array(a.astype(np.float32), inits[0].name))
    assert _rules(m) == ["ROT002"]


def test_rotation_that_skips_the_quantize_is_rot003(rotated):
    m = onnx.load(str(rotated["qdq"]))
    names = {t.name for t in _rotation_inits(m)}
    mm = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in names)
    out = mm.output[0]
    reshape = next(n for n in m.graph.node if n.op_type == "Reshape" and out in n.input)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and reshape.output[0] in n.input)
    q.input[0] = mm.input[0]  # the QuantizeLinear reads the unrotated input: the rotation feeds nothing quantized
    # (the Reshape after the rotation is dead now; the rest of the graph is untouched)
    got = _rules(m)
    assert "ROT003" in got and "ROT001" in got


def test_a_down_proj_kept_in_float_is_not_rotated_and_the_graph_says_so(tiny_dirs, small_text, tmp_path):
    """--rotate-down with a fallback that keeps a down_proj in float: that Linear is not rotated, the graph records
    how many are (sq_export.rotated_linears) and passes; a count that does not match what the graph computes is
    ROT001 (before the record, the check wanted one rotation per layer and failed such a graph)."""
    model, tok = sq.load_model(tiny_dirs("llama"))
    calib = sq.calibrate(model, tok, small_text / "calib.txt", **CAL)
    qm = sq.quantize(model, calib, sq.Recipe(rotate_down=32, fallback="model.layers.1.mlp.down_proj"))
    path = sq.export_onnx(qm, tmp_path / "fb.onnx", weights="qdq").path
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["sq_export.rotated_linears"] == "1" and _rules(path) == []
    assert len(_rotation_inits(onnx.load(str(path)))) == 1
    assert _rules(_set_meta(onnx.load(str(path)), "rotated_linears", "2")) == ["ROT001"]
