"""The Python API (sq_export.api, re-exported by sq_export) end to end on tiny models of every family, the README's
example export script, the recipe presets, and the errors the API raises."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sq_export as sq
from sq_export.errors import BadInput, GraphCheckFailed

ROOT = Path(__file__).resolve().parent.parent
CAL = dict(samples=4, seq_len=32)


def test_import_is_light_and_names_resolve():
    code = ("import sys, sq_export as sq; r = sq.Recipe(); assert 'torch' not in sys.modules; "
            "import sq_export.engine, sq_export.passes; assert 'torch' not in sys.modules; "
            "assert callable(sq.quantize) and callable(sq.export_onnx); print(r.describe())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pair smoothing" in out and "fallback auto" in out
    with pytest.raises(AttributeError):
        sq.no_such_name


def test_api_end_to_end_every_family(family_name, tiny_dirs, small_text, tmp_path):
    from sq_export.measure.perplexity import onnx_perplexity

    model, tok = sq.load_model(tiny_dirs(family_name))
    calib = sq.calibrate(model, tok, small_text / "calib.txt", **CAL)
    assert calib.reservoir is not None and set(calib.act_max) == set(calib.act_max)
    x = calib.check_batch()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    qm = sq.quantize(model, calib, sq.Recipe(max_fallback="1"), copy=True)
    with torch.no_grad():  # the float model is untouched by a copying quantize
        assert torch.equal(model(input_ids=x).logits, ref)
    p = qm.prepared
    assert qm.recipe.linear_pairs and p.alpha_per_group and len(p.fp16_layers) <= 1
    assert len(p.quantized) + len(p.fp16_layers) == len(qm.family.quantized_linears())
    g = sq.export_onnx(qm, tmp_path / "m.onnx", weights="qdq")
    assert g.path.is_file() and g.metadata["mode"] == "sq" and g.metadata["smooth_pairs"] == "1"
    assert g.metadata["source_model"] == str(tiny_dirs(family_name))
    # the family's INT8-engine FP16 default travels in the graph to the TensorRT 8.x build plan (Gemma-3: off)
    from sq_export.engine.trt_compat import graph_facts, plan_build

    assert g.metadata.get("int8_fp16") == ("0" if family_name == "gemma3" else None)
    assert plan_build("8.6.0", "int8", graph_facts(g.path)).fp16_flag is (family_name != "gemma3")
    assert plan_build("8.6.0", "int8", graph_facts(g.path), fp16=True).fp16_flag  # `build --fp16`
    report = sq.check(g.path, target="trt")
    assert report.raise_for_violations() is report and report.ok
    from sq_export.api import text_ids

    ids = text_ids(tok, small_text / "eval.txt", "eval")
    pt = sq.perplexity(qm, text=ids, seq_len=64, max_tokens=256)["perplexity"]
    ort = onnx_perplexity(str(g.path), ids, 64, 256)["perplexity"]
    assert ort == pytest.approx(pt, rel=2e-3)  # the graph computes what the fake-quant model computes
    fp = sq.export_onnx(model, tmp_path / "fp.onnx")  # a float model exports as the reference graph
    assert fp.metadata["mode"] == "fp" and fp.metadata["quantized_layers_total"] == 0 and "int8_fp16" not in fp.metadata


def test_quantize_calibrates_itself_given_a_tokenizer_and_in_place(tiny_dirs, small_text):
    model, tok = sq.load_model(tiny_dirs("llama"))
    r = sq.make_recipe("paper", calib=sq.CalibOptions(str(small_text / "calib.txt"), 4, 32))
    qm = sq.quantize(model, recipe=r, tokenizer=tok)
    assert qm.model is model and qm.calibration is not None and qm.alpha == 0.85
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "QLinear"
    with pytest.raises(BadInput, match="calibration statistics"):
        sq.quantize(sq.load_model(tiny_dirs("llama"))[0], recipe=r)
    bare = sq.calibrate(sq.load_model(tiny_dirs("llama"))[0], tok, small_text / "calib.txt", rows=None, **CAL)
    with pytest.raises(BadInput, match="row sample"):
        sq.quantize(sq.load_model(tiny_dirs("llama"))[0], bare, sq.Recipe())


def test_default_recipe_beats_the_paper_recipe_on_injected_outliers():
    """On a tiny Llama with outlier channels the default recipe (pairs + α per group + fallback) lands closer to the
    float model than the paper's (norm folds, fixed α), measured on token windows it was not tuned on."""
    from sq_export.quant.calibrate import calibrate_ids
    from sq_export.quant.prepare import prepare, working_copy
    from sq_export.synth import make_tiny, token_batches

    model, fam = make_tiny("llama")
    stream = token_batches(1, 64 * 32, seed=5)[0]
    calib = calibrate_ids(model, fam, stream, sq.CalibOptions(None, 32, 64), rows=256)
    held = torch.as_tensor(token_batches(8, 64, seed=99))
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=held).logits, -1)

    def kl(recipe):
        m = working_copy(model, fam, smoothing=True, linear_pairs=True)
        from sq_export.families import family_for

        prepare(m, family_for(m), recipe, calib)
        with torch.no_grad():
            q = torch.log_softmax(m(input_ids=held).logits, -1)
        return float((ref.exp() * (ref - q)).sum(-1).mean())

    o = calib.options
    default, paper, naive = kl(sq.Recipe(calib=o)), kl(sq.Recipe.paper(calib=o)), kl(sq.Recipe.naive(calib=o))
    assert default < paper < naive, (default, paper, naive)
    assert default < 0.5 * paper


def test_recipes_presets_and_overrides():
    r = sq.Recipe()
    assert (r.alpha, r.linear_pairs, r.fallback, r.mode) == ("auto", True, "auto", "sq") and r.needs_rows()
    p = sq.Recipe.paper()
    assert (p.alpha, p.linear_pairs, p.fallback) == (None, False, None) and not p.needs_rows()
    assert sq.Recipe.naive().mode == "naive" and sq.Recipe.naive().needs_calibration()
    assert sq.make_recipe("default", fallback="none").fallback is None
    assert sq.make_recipe("default", alpha="default").alpha is None
    assert sq.make_recipe("paper", alpha="0.7").alpha == 0.7
    assert "attention Q/DQ" in sq.make_recipe("default", linear_pairs=False, quantize_attention=True).describe()
    # the default rotates the down_proj inputs where that applies (SmoothQuant with max ranges); none turns it off
    assert r.rotate_down == 64 and p.rotate_down is None and sq.Recipe.naive().rotate_down is None
    assert sq.Recipe(mode="naive", fallback=None).rotate_down is None and sq.Recipe(mode="naive", rotate_down=32).rotate_down == 32
    assert sq.Recipe.fp().rotate_down is None and sq.make_recipe("default", mode="fp", fallback="none").rotate_down is None
    assert sq.make_recipe("default", clip="p99.9").rotate_down is None
    assert sq.make_recipe("default", rotate_down="none").rotate_down is None and sq.Recipe(rotate_down=128).rotate_down == 128
    assert r.baseline() == sq.make_recipe("naive")
    for bad, msg in (({"alpha": 1.5}, "outside"), ({"clip": "p3"}, "--clip"), ({"fallback": "auto", "max_fallback": "x"}, "max-fallback")):
        with pytest.raises(BadInput, match=msg):
            sq.make_recipe("default", **bad)
    with pytest.raises(BadInput, match="--recipe"):
        sq.make_recipe("best")
    with pytest.raises(TypeError):
        sq.make_recipe("default", nonsense=1)


def test_cli_recipe_flags_reach_the_recipe():
    from sq_export.cli import build_parser
    from sq_export.commands._common import recipe_from

    p = build_parser()
    base = ["export", "m", "-o", "x.onnx"]
    r = recipe_from(p.parse_args(base))
    assert (r.alpha, r.linear_pairs, r.fallback) == ("auto", True, "auto")
    r = recipe_from(p.parse_args(base + ["--recipe", "paper", "--smooth-pairs"]))
    assert (r.alpha, r.linear_pairs, r.fallback) == (None, True, None)
    r = recipe_from(p.parse_args(base + ["--no-smooth-pairs", "--fallback", "none", "--alpha", "0.6"]))
    assert (r.alpha, r.linear_pairs, r.fallback) == (0.6, False, None)
    r = recipe_from(p.parse_args(base + ["--mode", "naive"]))
    assert r == sq.make_recipe("naive")
    r = recipe_from(p.parse_args(base + ["--quantize-attention", "--quantize-lm-head", "--target-ppl-increase", "1%"]))
    assert r.quantize_attention and r.quantize_lm_head and r.target_ppl_increase == pytest.approx(0.01)


def test_check_raises_for_violations(tmp_path):
    from _sqgraphs import GRAPHS

    r = sq.check(GRAPHS / "unfolded_mul_rms.onnx", target="tensorrt")
    assert not r.ok
    with pytest.raises(GraphCheckFailed, match="SQ00"):
        r.raise_for_violations()
    assert sq.check(GRAPHS / "clean_rms.onnx", target="trt").ok  # both spellings of --target
    with pytest.raises(BadInput, match="--target"):
        sq.check(GRAPHS / "clean_rms.onnx", target="tensorrrt")


def test_a_model_folder_without_tokenizer_says_so(tiny_dirs, tmp_path, capsys):
    """A checkpoint saved with save_pretrained alone: the error names the missing tokenizer, not the text."""
    from sq_export.cli import main

    model, _ = sq.load_model(tiny_dirs("llama"), with_tokenizer=False)
    bare = tmp_path / "bare"
    model.save_pretrained(bare, safe_serialization=True)
    capsys.readouterr()
    code = main(["-q", "calibrate", str(bare), "-o", str(tmp_path / "c"), "--samples", "2", "--calib-seq-len", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tokenizer" in err[0] and "--tokenizer" in err[0], err
    assert not (tmp_path / "c").exists()
    # --tokenizer points at one: the same command works
    code = main(["-q", "calibrate", str(bare), "--tokenizer", str(tiny_dirs("llama")), "-o", str(tmp_path / "c"),
                 "--samples", "2", "--calib-seq-len", "16"])
    assert code == 0 and (tmp_path / "c" / "act_scales.safetensors").is_file()
    # a tokenizer of another model (ids beyond this vocabulary): one line, not an IndexError
    from sq_export.synth import make_tiny

    small, _ = make_tiny("llama")  # vocabulary 256 < the tokenizer's
    small.save_pretrained(tmp_path / "small", safe_serialization=True)
    capsys.readouterr()
    code = main(["-q", "calibrate", str(tmp_path / "small"), "--tokenizer", str(tiny_dirs("llama")), "-o", str(tmp_path / "d"),
                 "--samples", "2", "--calib-seq-len", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "vocabulary" in err[0], err


def _readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- example: examples/export_int8.py -->\n```python\n(.*?)```", text, re.S)
    assert m, "README has the example export script"
    return m.group(1)


def test_readme_example_script_is_the_tested_file_and_runs(tiny_dirs, tmp_path):
    script = ROOT / "examples" / "export_int8.py"
    assert _readme_script().strip() in script.read_text()
    out = tmp_path / "ex"
    r = subprocess.run([sys.executable, str(script), str(tiny_dirs("llama")), str(out), "4"], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "graph check clean" in r.stdout and "perplexity: float" in r.stdout and (out / "model.onnx").is_file()
    from sq_export.onnxio.meta import read_metadata

    meta = read_metadata(out / "model.onnx")
    assert meta["weights"] == "qdq" and meta["smooth_pairs"] == "1" and json.loads(meta["alpha_per_group"])
    assert np.isfinite(float(re.search(r"W8A8 ([0-9.]+)", r.stdout).group(1)))


def test_linear_sqnr_is_the_diagnose_view(tiny_dirs, small_text, tmp_path):
    """sq.linear_sqnr (what `sq-export diagnose` prints): every quantized Linear once, worst SmoothQuant first,
    SmoothQuant above naive W8A8 on average on the injected outliers, the chart written; --prefix-outliers refused."""
    model, tok = sq.load_model(tiny_dirs("llama"), device="cpu")
    recipe = sq.make_recipe("paper", calib=sq.CalibOptions(str(small_text / "calib.txt"), 4, 64, 2))
    res = sq.linear_sqnr(model, tok, recipe, windows=2, plot=tmp_path / "sqnr.png")
    from sq_export.families import family_for

    names = family_for(model).quantized_linears()
    assert sorted(r["linear"] for r in res["rows"]) == sorted(names)
    sq_db = [r["sq_db"] for r in res["rows"]]
    assert sq_db == sorted(sq_db, key=lambda v: float("inf") if v is None else v)
    assert res["mean_sqnr_db"]["sq"] > res["mean_sqnr_db"]["naive"]
    assert (tmp_path / "sqnr.png").stat().st_size > 0 and res["tokens"] == 2 * 64
    with pytest.raises(BadInput, match="prefix"):
        sq.linear_sqnr(model, tok, sq.make_recipe("paper", prefix_outliers="auto"), windows=1)
