"""tools/peer_table.py (ModelOpt's INT8 SmoothQuant next to sq_export's recipes) on a tiny Llama: every row runs,
ModelOpt's quantizers look as the tool's docstring says, and a missing ModelOpt is one line and exit 2."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("peer_table", ROOT / "tools" / "peer_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_modelopt_is_one_line_and_exit_2(monkeypatch, capsys):
    pt = _tool()
    monkeypatch.setitem(sys.modules, "modelopt", None)  # import modelopt... raises ImportError
    monkeypatch.setitem(sys.modules, "modelopt.torch", None)
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    assert pt.main(["--model", "does-not-matter", "--rows", "fp32,modelopt_sq_1.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and "nvidia-modelopt" in err[0]


def test_peer_table_tiny_llama(tmp_path, small_text):
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed (CI has no ModelOpt)")
    from conftest import save_tiny

    pt = _tool()
    save_tiny("llama", tmp_path / "m")
    logs = []
    res = pt.peer_table(str(tmp_path / "m"), samples=4, calib_seq_len=64, seq_len=64, max_tokens=512,
                        text=str(small_text / "eval.txt"), calib_text=str(small_text / "calib.txt"),
                        rows=pt.ALL_ROWS, log=logs.append)
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows) == list(pt.ALL_ROWS)
    n = res["linears"]
    assert n == 14  # 2 layers x 7
    for r in rows.values():
        assert math.isfinite(r["perplexity"]) and r["tokens"] == rows["fp32"]["tokens"] > 0
    assert rows["fp32"]["delta_pct"] is None
    for k in ("naive", "paper", "accurate", *pt.PEER, *pt.EXTRA):
        assert rows[k]["float_linears"] == 0 and rows[k]["quantized_linears"] == n, k
    assert rows["accurate_fallback"]["float_linears"] + rows["accurate_fallback"]["quantized_linears"] == n
    # the same calibration maxima on both sides: ModelOpt's max calibration without smoothing is sq_export's naive
    # W8A8 (same windows, same INT8 arithmetic); only float summation order may differ
    assert rows["modelopt_int8"]["perplexity"] == pytest.approx(rows["naive"]["perplexity"], rel=2e-3)

    q = res["quantizers"]
    for k in ("modelopt_sq_1.0", "modelopt_sq_0.85"):
        roles = q[k]["summary"]["roles"]
        assert all(s["pre_quant_scale"] == s["linears"] == s["in_per_tensor"] == s["w_per_channel"] for s in roles.values()), roles
        assert {"self_attn.o_proj", "mlp.down_proj"} <= set(roles)  # smoothed too, with no norm in front
    # one vector per Linear, from its own weight: at α 1 (s = 1/max|x|) the weights drop out, so q/k/v agree
    # and could be folded into the norm; below 1 they differ
    one = q["modelopt_sq_1.0"]["summary"]["group_pqs_spread"]
    assert one["q_proj+k_proj+v_proj"] == pytest.approx(1.0) and one["gate_proj+up_proj"] == pytest.approx(1.0)
    low = q["modelopt_sq_0.85"]["summary"]["group_pqs_spread"]
    assert low["q_proj+k_proj+v_proj"] > 1.01 and low["gate_proj+up_proj"] > 1.01
    pairs = q["modelopt_sq_0.85"]["summary"]["pair_pqs_spread"]
    assert pairs["v_proj->o_proj"]["kv_repeat"] == 2 and pairs["v_proj->o_proj"]["spread"] > 1.01  # GQA: heads disagree
    assert all(s["pre_quant_scale"] == 0 and s["in_per_tensor"] == s["linears"] for s in q["modelopt_int8"]["summary"]["roles"].values())
    exp = q["modelopt_sq_0.85_export"]["summary"]["group_pqs_spread"]
    assert exp["q_proj+k_proj+v_proj"] == pytest.approx(1.0) and exp["gate_proj+up_proj"] == pytest.approx(1.0)
    assert any("pre_quant_scale vectors differ" in s for s in logs)
    assert "| ModelOpt INT8_SMOOTHQUANT_CFG, α 1.0 (default) |" in pt.markdown(res)


def test_prefix_rows_without_modelopt_match_eval(tmp_path, small_text, monkeypatch, capsys):
    """The outlier-prefix rows need no ModelOpt, bring fp32_prefix along, and measure what `sq-export eval
    --prefix-outliers auto` measures (its calibration and prepare path, the same scored tokens)."""
    import json

    from conftest import save_tiny

    from sq_export.cli import main

    pt = _tool()
    monkeypatch.setitem(sys.modules, "modelopt", None)
    monkeypatch.setitem(sys.modules, "modelopt.torch", None)
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    save_tiny("llama", tmp_path / "m")
    kw = dict(samples=4, calib_seq_len=32, seq_len=64, max_tokens=256, text=str(small_text / "eval.txt"),
              calib_text=str(small_text / "calib.txt"))
    res = pt.peer_table(str(tmp_path / "m"), rows=("prefix_alpha085", "prefix_kl"), log=lambda s: None, **kw)
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows) == ["fp32", "fp32_prefix", "prefix_alpha085", "prefix_kl"]
    assert rows["fp32"]["tokens"] == rows["fp32_prefix"]["tokens"] == rows["prefix_kl"]["tokens"] == 252  # prefix not scored
    assert rows["fp32_prefix"]["delta_prefix_pct"] is None and rows["fp32"]["delta_prefix_pct"] is not None
    for k in ("prefix_alpha085", "prefix_kl"):
        assert rows[k]["float_linears"] == 0 and rows[k]["quantized_linears"] == res["linears"]
        assert rows[k]["prefix_outliers"]["tokens"] == rows["fp32_prefix"]["prefix_outliers"]["tokens"]
    assert "| vs FP32 + prefix |" in pt.markdown(res)
    common = ["--calib-text", kw["calib_text"], "--samples", "4", "--calib-seq-len", "32", "--text", kw["text"],
              "--max-tokens", "256", "--seq-len", "64", "--prefix-outliers", "auto", "--json"]
    for key, args in (("fp32_prefix", ["--mode", "fp"]), ("prefix_alpha085", ["--alpha", "0.85", "--fallback", "none"])):
        assert main(["-q", "eval", str(tmp_path / "m"), *args, *common]) == 0
        ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert ev["tokens"] == rows[key]["tokens"] and ev["prefix_outliers"]["tokens"] == rows[key]["prefix_outliers"]["tokens"]
        assert ev["perplexity"] == pytest.approx(rows[key]["perplexity"], rel=1e-5), key
    # the default table is unchanged: no prefix rows, no extra column
    assert not any(r in pt.DEFAULT_ROWS or r in pt.ALL_ROWS for r in pt.PREFIX)
