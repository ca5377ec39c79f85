import json
import shutil

import numpy as np
import onnx
import pytest

from _sqgraphs import GRAPHS, feeds, run
from sq_export import cli
from sq_export.passes.check import run_check
from sq_export.errors import BadInput


@pytest.fixture
def main(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["check"])  # other subcommands may not exist yet
    return cli.main


def g(name):
    return str(GRAPHS / f"{name}.onnx")


def test_clean_exit_0(main, capsys):
    assert main(["check", g("clean_rms")]) == 0
    assert "OK: no violations" in capsys.readouterr().out


def test_violations_exit_1_json(main, capsys):
    assert main(["check", g("unfolded_mul_rms"), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["ok"] is False
    assert [v["rule"] for v in rep["violations"]] == ["SQ001"]
    assert rep["summary"]["norms"] == {"rmsnorm": 3}
    assert rep["summary"]["matmul_quantized"] == 8 and rep["summary"]["matmul_float"] == 1


@pytest.mark.parametrize("name", ["unfolded_mul_ln", "unfolded_shared_norm_rms"])
def test_fix_writes_and_rechecks(main, capsys, tmp_path, name):
    out = tmp_path / "fixed.onnx"
    assert main(["check", g(name), "--fix", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["ok"] and rep["fixed_path"] == str(out)
    assert {v["rule"] for v in rep["violations_before_fix"]} == {"SQ001"}
    assert len(rep["folds"]) >= 1
    fixed, orig = onnx.load(out), onnx.load(g(name))
    np.testing.assert_allclose(run(fixed, feeds()), run(orig, feeds()), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.onnx"]  # no temp files left


def test_fix_cannot_fix_linear_smoothing(main, tmp_path):
    assert main(["check", g("mul_before_down"), "--fix", str(tmp_path / "f.onnx")]) == 1
    assert (tmp_path / "f.onnx").exists()


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sq-export check: error: ")
    return err


def test_not_onnx_exit_2(main, capsys, tmp_path):
    p = tmp_path / "m.onnx"
    p.write_text("definitely not a protobuf\n" * 10)
    assert main(["check", str(p)]) == 2
    assert "not a readable ONNX model" in _err(capsys)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.97])
def test_truncated_exit_2(main, capsys, tmp_path, cut):
    data = (GRAPHS / "clean_rms.onnx").read_bytes()
    p = tmp_path / "t.onnx"
    p.write_bytes(data[: int(len(data) * cut)])
    assert main(["check", str(p)]) == 2
    _err(capsys)


def test_missing_file_exit_2(main, capsys, tmp_path):
    assert main(["check", str(tmp_path / "nope.onnx")]) == 2
    assert "no such file" in _err(capsys)


def test_fix_onto_input_exit_2(main, capsys, tmp_path):
    p = tmp_path / "m.onnx"
    shutil.copy(g("unfolded_mul_rms"), p)
    before = p.read_bytes()
    assert main(["check", str(p), "--fix", str(tmp_path / "." / "m.onnx")]) == 2
    assert "is the input file" in _err(capsys)
    assert p.read_bytes() == before


def test_nothing_to_check_exit_2(main, capsys):
    assert main(["check", g("plain_no_norm_no_qdq")]) == 2
    assert "nothing to check" in _err(capsys)


def test_run_check_api():
    rep = run_check(onnx.load(g("qdq_on_output")))
    assert [v.rule for v in rep.violations] == ["QDQ011"]
    assert "QDQ011" in rep.format_text() and rep.to_json()["summary"]["violations_by_rule"] == {"QDQ011": 1}
    with pytest.raises(BadInput):
        run_check(g("plain_no_norm_no_qdq"))


def test_external_data_model(tmp_path):
    """Models saved with external data (how > 2 GB exports are stored) load lazily and --fix keeps working."""
    m = onnx.load(g("unfolded_mul_rms"))
    src = tmp_path / "ext.onnx"
    onnx.save(m, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    rep = run_check(src, fix_out=tmp_path / "out.onnx")
    assert rep.ok and len(rep.folds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "out.onnx"]
    out = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert not any(i.external_data for i in out.graph.initializer)  # self-contained, no link to the input's data
    ref = onnx.load(g("unfolded_mul_rms"))  # onnx.save above turned `m` external in place
    np.testing.assert_allclose(run(out, feeds()), run(ref, feeds()), rtol=1e-5, atol=1e-5)
