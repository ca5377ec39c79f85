"""Engine side on CPU: token files, ONNX Runtime comparisons and perplexity, CLI exit codes, and clean
BackendMissing when TensorRT is absent. No TensorRT, no GPU, no torch needed."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from sq_export.engine.compare import compare, format_table
from sq_export.engine.run import load_tokens, onnx_perplexity
from sq_export.errors import BackendMissing, BadInput
from sq_export.measure.perplexity import PerplexityAccumulator
from test_engine_models import reference_logits, tiny_lm, token_file


def parser():
    from sq_export.commands import build as build_cmd
    from sq_export.commands import compare as compare_cmd

    p = argparse.ArgumentParser(prog="sq-export")
    sub = p.add_subparsers(dest="command")
    build_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    return p


def cli(argv):
    args = parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def models(tmp_path):
    return {
        "a": tiny_lm(tmp_path / "a.onnx"),
        "b": tiny_lm(tmp_path / "b.onnx"),
        "perturbed": tiny_lm(tmp_path / "p.onnx", perturb=0.3),
        "q": tiny_lm(tmp_path / "q.onnx", quant=True),
        "tokens": token_file(tmp_path / "t.npz"),
    }


# ---- token files ----------------------------------------------------------------------------------------------


def test_load_tokens_ok(tmp_path):
    t = load_tokens(token_file(tmp_path / "t.npz", n_chunks=3, seq_len=8, last_len=5))
    assert t.input_ids.dtype == np.int64 and t.input_ids.shape == (3, 8)
    assert t.lengths.tolist() == [8, 8, 5]
    assert t.valid_mask().sum() == 21
    # without `lengths`, the mask tells the padding
    t2 = load_tokens(token_file(tmp_path / "t2.npz", n_chunks=2, seq_len=8, last_len=None))
    assert t2.lengths.tolist() == [8, 8]


def test_load_tokens_mask_only_padding(tmp_path):
    ids = np.ones((2, 6), np.int64)
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], np.int64)
    np.savez(tmp_path / "m.npz", input_ids=ids, attention_mask=mask)
    assert load_tokens(tmp_path / "m.npz").lengths.tolist() == [6, 3]


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"ids": np.zeros((2, 4), np.int64)}, "no `input_ids`"),
        ({"input_ids": np.zeros((4,), np.int64)}, r"\[n_chunks"),
        ({"input_ids": np.zeros((2, 4), np.float32)}, "integers"),
        ({"input_ids": -np.ones((2, 4), np.int64)}, "negative"),
        ({"input_ids": np.zeros((2, 4), np.int64), "attention_mask": np.ones((2, 3), np.int64)}, "attention_mask"),
        ({"input_ids": np.zeros((2, 4), np.int64), "attention_mask": np.full((2, 4), 2, np.int64)}, "only 0 and 1"),
        ({"input_ids": np.zeros((2, 4), np.int64), "lengths": np.array([4, 9])}, "lengths must lie"),
        (
            {"input_ids": np.zeros((2, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64), "lengths": np.array([4, 2])},
            "right padding",
        ),
    ],
)
def test_load_tokens_rejects(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInput, match=match):
        load_tokens(tmp_path / "bad.npz")


def test_load_tokens_unreadable(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_tokens(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInput, match="not a readable"):
        load_tokens(tmp_path / "junk.npz")


# ---- comparisons through Polygraphy's Comparator (two ONNX Runtime runners) ------------------------------------


def test_identical_models_agree(models):
    r = compare([models["a"], models["b"]], models["tokens"], batches=None, batch_size=2, atol=1e-6, rtol=1e-6)
    m = r["comparisons"][0]["outputs"]["logits"]
    assert r["passed"] and m["passed"]
    assert m["cosine"] == pytest.approx(1.0, abs=1e-9) and m["top1"] == 1.0
    assert m["max_abs"] == 0.0 and m["polygraphy_elementwise_pass"] is True
    assert m["positions"] == 4 * 16 + 9  # padding excluded
    assert r["batches"] == 3
    assert "PASS" in format_table(r)


def test_perturbed_model_fails(models):
    r = compare([models["a"], models["perturbed"]], models["tokens"], batches=2, min_cosine=0.99, min_top1=0.9)
    m = r["comparisons"][0]["outputs"]["logits"]
    assert not r["passed"] and not m["passed"]
    assert m["cosine"] < 0.99 and m["top1"] < 0.9
    assert any("cosine" in f for f in m["failures"])
    assert "FAIL" in format_table(r)


def test_quantized_model_close_but_not_elementwise(models):
    r = compare([models["a"], models["q"]], models["tokens"], batches=None, atol=1e-4, rtol=1e-3)
    m = r["comparisons"][0]["outputs"]["logits"]
    assert m["cosine"] > 0.999 and m["top1"] > 0.95
    assert m["polygraphy_elementwise_pass"] is False and not r["passed"]
    # the same without the element-wise tolerances passes
    r2 = compare([models["a"], models["q"]], models["tokens"], batches=None)
    assert r2["passed"]


def test_metrics_match_numpy(models):
    tok = load_tokens(models["tokens"])
    r = compare([models["a"], models["q"]], tok, batches=None, batch_size=5)
    ref = reference_logits(tok.input_ids, tok.attention_mask)
    q = reference_logits(tok.input_ids, tok.attention_mask, quant=True)
    v = tok.valid_mask()
    d = np.abs(ref - q)[v]
    m = r["comparisons"][0]["outputs"]["logits"]
    assert m["max_abs"] == pytest.approx(float(d.max()), rel=1e-3)
    assert m["mean_abs"] == pytest.approx(float(d.mean()), rel=1e-3)
    assert m["top1"] == pytest.approx(float((ref.argmax(-1) == q.argmax(-1))[v].mean()))


def test_padding_does_not_count(models, tmp_path):
    # A model that differs from the reference only at padding positions (attention_mask 0) compares equal.
    b = tiny_lm(tmp_path / "pad.onnx", pad_offset=5.0)
    r = compare([models["a"], b], models["tokens"], batches=None, atol=0, rtol=0)
    m = r["comparisons"][0]["outputs"]["logits"]
    assert r["passed"] and m["max_abs"] == 0.0 and m["positions"] == 4 * 16 + 9


def test_perplexity_matches_numpy(models):
    tok = load_tokens(models["tokens"])
    p = onnx_perplexity(models["a"], models["tokens"], batch_size=2)
    acc = PerplexityAccumulator()
    logits = reference_logits(tok.input_ids, tok.attention_mask)
    for i in range(tok.n_chunks):
        n = int(tok.lengths[i])
        acc.add(logits[i, :n], tok.input_ids[i, :n])
    assert p["perplexity"] == pytest.approx(acc.perplexity, rel=1e-5)
    assert p["predicted_tokens"] == 4 * 15 + 8
    r = compare([models["a"], models["b"]], tok, batches=1, perplexity=True)
    assert r["models"][0]["perplexity"] == pytest.approx(acc.perplexity, rel=1e-5)
    assert r["models"][1]["perplexity"] == pytest.approx(acc.perplexity, rel=1e-5)


def test_compare_bad_inputs(models, tmp_path):
    with pytest.raises(BadInput, match="at least two"):
        compare([models["a"]], models["tokens"])
    with pytest.raises(BadInput, match="expected an .onnx"):
        compare([models["a"], str(tmp_path / "x.bin")], models["tokens"])
    with pytest.raises(BadInput, match="does not exist"):
        compare([models["a"], str(tmp_path / "missing.onnx")], models["tokens"])
    with pytest.raises(BadInput):
        compare([models["a"], models["b"]], models["tokens"], batches=0)


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_cli_compare_exit_codes(models, capsys):
    assert cli(["compare", models["a"], models["b"], "--tokens", models["tokens"]]) == 0
    assert "overall: PASS" in capsys.readouterr().out
    assert cli(["compare", models["a"], models["perturbed"], "--tokens", models["tokens"], "--json"]) == 1
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["passed"] is False
    assert cli(["compare", models["a"], models["q"], "--tokens", models["tokens"], "--atol", "1e-4", "--rtol", "1e-3"]) == 1
    assert cli(["compare", models["a"], models["q"], "--tokens", models["tokens"], "--perplexity", "--batches", "0"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out
    with pytest.raises(BadInput, match="--tokens"):
        cli(["compare", models["a"], models["b"]])


def test_cli_build_bad_ranges(models, tmp_path):
    with pytest.raises(BadInput, match="MIN:OPT:MAX"):
        cli(["build", models["q"], "-o", str(tmp_path / "q.engine"), "--batch", "1:x:4"])
    with pytest.raises(BadInput, match="min <= opt <= max"):
        cli(["build", models["q"], "-o", str(tmp_path / "q.engine"), "--seq", "8:4:2"])


# ---- TensorRT absent -> BackendMissing (exit 3), before any work --------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_build_without_tensorrt(no_tensorrt, models, tmp_path):
    from sq_export.engine.build import build_engine

    out = tmp_path / "q.engine"
    with pytest.raises(BackendMissing, match="TensorRT") as e:
        build_engine(models["q"], out, precision="int8")
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert not out.exists() and not (tmp_path / "q.engine.json").exists()
    with pytest.raises(BackendMissing):
        cli(["build", models["q"], "-o", str(out)])


def test_build_bad_onnx_before_backend(no_tensorrt, tmp_path):
    from sq_export.engine.build import build_engine

    with pytest.raises(BadInput, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "x.engine")
    with pytest.raises(BadInput, match="output folder"):
        build_engine(tiny_lm(tmp_path / "q.onnx", quant=True), tmp_path / "no" / "dir" / "x.engine")


def test_compare_engine_without_tensorrt(no_tensorrt, models, tmp_path):
    eng = tmp_path / "q.engine"
    eng.write_bytes(b"\x00" * 64)
    with pytest.raises(BackendMissing) as e:
        compare([models["a"], str(eng)], models["tokens"])
    assert e.value.exit_code == 3
    with pytest.raises(BackendMissing):
        cli(["compare", models["a"], str(eng), "--tokens", models["tokens"]])
    from sq_export.engine.run import engine_perplexity

    with pytest.raises(BackendMissing):
        engine_perplexity(eng, models["tokens"])


def test_missing_engine_is_bad_input(models, tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        compare([models["a"], str(tmp_path / "none.engine")], models["tokens"])


def test_imports_are_torch_free():
    import subprocess

    code = (
        "import sys; import sq_export.engine.build, sq_export.engine.compare, sq_export.engine.run, "
        "sq_export.engine.trt_compat, sq_export.commands.build, sq_export.commands.compare; "
        "bad = [m for m in ('torch', 'transformers', 'tensorrt') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
