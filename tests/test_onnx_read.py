"""Issue 5 (memory): `check` reads an .onnx file without its weights (sq_export.onnxio.read), with the same report."""

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from _sqgraphs import GRAPHS
from sq_export.onnxio import read as onnx_read
from sq_export.passes.check import run_check

NAMES = sorted(p.stem for p in GRAPHS.glob("*.onnx") if p.stem != "plain_no_norm_no_qdq")


def _full_check(monkeypatch, path, **kw):
    """run_check as it was: the whole file parsed, by onnx.checker and by onnx_ir."""
    with monkeypatch.context() as m:
        m.setattr(onnx_read, "load_lazy", lambda p: None)
        m.setattr(onnx_read, "checker_message", lambda p: (False, None))
        return run_check(path, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_lazy_check_reports_what_the_full_check_reports(monkeypatch, tmp_path, name):
    src = tmp_path / f"{name}.onnx"
    shutil.copy(GRAPHS / f"{name}.onnx", src)
    assert onnx_read.read_skeleton(src) is not None  # every test graph takes the lazy path
    assert run_check(src).to_json() == _full_check(monkeypatch, src).to_json()
    if name.startswith("unfolded_"):
        a = run_check(src, fix_out=tmp_path / "a.onnx")
        b = _full_check(monkeypatch, src, fix_out=tmp_path / "b.onnx")
        assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
        assert {**a.to_json(), "fixed_path": None, "source": None} == {**b.to_json(), "fixed_path": None, "source": None}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_lazy_model_equals_the_full_model():
    path = GRAPHS / "clean_rms_int8w.onnx"
    lazy = onnx_read.load_lazy(path)
    assert lazy is not None
    assert ir.to_proto(lazy).SerializeToString() == ir.to_proto(ir.load(path)).SerializeToString()


def test_check_reads_no_weight_bytes(monkeypatch, tmp_path):
    """The passes read scales, zero points and norm weights; no MatMul weight is ever read."""
    src = tmp_path / "m.onnx"
    shutil.copy(GRAPHS / "clean_rms_int8w.onnx", src)
    proto = onnx.load(src)
    weights = {i.name for i in proto.graph.initializer if np.prod(i.dims) >= 64}
    assert weights
    read = []
    orig = ir.LazyTensor._evaluate
    monkeypatch.setattr(ir.LazyTensor, "_evaluate", lambda self: (read.append(self.name), orig(self))[1])
    rep = run_check(src)
    assert rep.ok
    assert read, "check did not take the lazy path"
    assert not weights & set(read), sorted(weights & set(read))


@pytest.mark.parametrize("damage", ["truncate", "raw_size", "external"])
def test_files_the_reader_declines_go_the_ordinary_way(tmp_path, damage):
    src = tmp_path / "m.onnx"
    m = onnx.load(GRAPHS / "clean_rms.onnx")
    if damage == "raw_size":
        t = max(m.graph.initializer, key=lambda i: len(i.raw_data))
        t.raw_data = t.raw_data[:-4]
        onnx.save(m, src)
    elif damage == "external":
        onnx.save(m, src, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    else:
        onnx.save(m, src)
        src.write_bytes(src.read_bytes()[:-100])
    assert onnx_read.read_skeleton(src) is None and onnx_read.load_lazy(src) is None
    assert onnx_read.checker_message(src) == (False, None)
    if damage == "raw_size":
        assert not run_check(src).ok  # onnx.checker on the file itself: raw_data too small
    elif damage == "external":
        assert run_check(src).ok
