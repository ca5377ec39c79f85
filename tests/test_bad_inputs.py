"""Every CLI command against each bad input: one clear line on stderr (no traceback unless --debug), the
documented exit code (2 bad input, 3 backend missing, 4 refused), and no artifact left behind."""

import os
import struct

import pytest
import torch

from conftest import save_tiny
from sq_export.cli import main

CAL = ["--samples", "2", "--calib-seq-len", "16"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "out").mkdir()
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02garbage" * 100)
    (d / "short.txt").write_text("Too short.")
    (d / "notonnx.onnx").write_text("this is not a protobuf")
    (d / "corrupt.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64)
    cm = d / "corrupt_model"
    cm.mkdir()
    (cm / "config.json").write_text("{ not json")
    good = d / "llama"
    save_tiny("llama", good)
    trunc = d / "truncated.onnx"
    from sq_export.export.exporter import export_onnx
    from conftest import make_tiny

    m, fam = make_tiny("opt")
    export_onnx(m, fam, d / "ok.onnx")
    trunc.write_bytes((d / "ok.onnx").read_bytes()[:5000])
    nan = d / "nan_model"
    m2, _ = save_tiny("opt", nan)
    sd = {k: v.clone() for k, v in m2.state_dict().items()}
    k = next(k for k in sd if k.endswith("fc1.weight"))
    sd[k][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items() if "lm_head" not in k}, str(nan / "model.safetensors"))
    import transformers

    unsup = d / "gptj"  # an architecture with no adapter (GPT-NeoX, the earlier example, has one now)
    cfg = transformers.GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=128)
    transformers.GPTJForCausalLM(cfg).save_pretrained(unsup)
    calib = d / "calib.txt"
    from sq_export.textdata import DEFAULT_CALIB

    calib.write_text(DEFAULT_CALIB.read_text()[:4000])
    # act scales of another model (OPT) for the Llama folder
    assert main(["-q", "calibrate", str(d / "nan_model").replace("nan_model", "ok_opt") if False else str(_opt_dir(d)), "--calib-text", str(calib), *CAL, "-o", str(d / "opt_scales")]) == 0
    return d


def _opt_dir(d):
    p = d / "opt"
    if not p.exists():
        save_tiny("opt", p)
    return p


def _cases(d):
    g, c = str(d / "llama"), str(d / "calib.txt")
    out = d / "out"
    return {
        "calibrate missing model": (["calibrate", "/nonexistent/model", "-o", str(out)], 2, "not found"),
        "eval missing model": (["eval", "/nonexistent/model"], 2, "not found"),
        "export missing model": (["export", "/nonexistent/model", "-o", str(out / "x.onnx")], 2, "not found"),
        "smooth corrupt model": (["smooth", str(d / "corrupt_model"), "--act-scales", str(d / "opt_scales" / "act_scales.safetensors"), "-o", str(out / "sm")], 2, "could not load"),
        "calibrate corrupt gguf": (["calibrate", str(d / "corrupt.gguf"), "-o", str(out)], 2, "could not load"),
        "eval unsupported architecture": (["eval", str(d / "gptj"), "--calib-text", c, *CAL], 2, "supported model types"),
        "calibrate empty text": (["calibrate", g, "--calib-text", str(d / "empty.txt"), "-o", str(out)], 2, "empty"),
        "calibrate missing text": (["calibrate", g, "--calib-text", str(d / "nope.txt"), "-o", str(out)], 2, "not found"),
        "eval binary text": (["eval", g, "--text", str(d / "binary.txt"), "--mode", "fp"], 2, "binary"),
        "calibrate fewer tokens than a sample": (["calibrate", g, "--calib-text", str(d / "short.txt"), "--calib-seq-len", "512", "-o", str(out)], 2, "fewer than one sample"),
        "eval alpha above 1": (["eval", g, "--alpha", "1.5"], 2, "outside [0, 1]"),
        "smooth alpha below 0": (["smooth", g, "--act-scales", "x", "--alpha", "-0.2", "-o", str(out / "sm")], 2, "outside [0, 1]"),
        "export alpha nan": (["export", g, "--alpha", "nan", "-o", str(out / "x.onnx")], 2, "outside [0, 1]"),
        "calibrate nan weights": (["calibrate", str(d / "nan_model"), "-o", str(out)], 2, "NaN"),
        "smooth act scales of another model": (["smooth", g, "--act-scales", str(d / "opt_scales" / "act_scales.safetensors"), "--calib-text", c, *CAL, "-o", str(out / "sm")], 2, "do not match this model"),
        "check not onnx": (["check", str(d / "notonnx.onnx")], 2, ""),
        "check truncated onnx": (["check", str(d / "truncated.onnx")], 2, ""),
        "eval truncated onnx": (["eval", str(d / "truncated.onnx")], 2, "ONNX"),
        "check fix onto input": (["check", str(d / "ok.onnx"), "--fix", str(d / "ok.onnx")], 2, ""),
        "export into missing folder": (["export", g, "-o", "/nonexistent/dir/x.onnx"], 2, "does not exist"),
        "export fp16 decode graph": (["export", g, "--dtype", "fp16", "--decode", "-o", str(out / "x.onnx")], 2, "--dtype fp32"),
        "calibrate into missing folder": (["calibrate", g, "-o", "/nonexistent/dir/out"], 2, "does not exist"),
        "tokens into missing folder": (["tokens", g, "-o", "/nonexistent/dir/t.npz"], 2, "does not exist"),
        "build without tensorrt": (["build", str(d / "ok.onnx"), "-o", str(out / "x.engine")], 3, "TensorRT"),
        "compare missing token file": (["compare", str(d / "ok.onnx"), str(d / "ok.onnx"), "--tokens", str(d / "nope.npz")], 2, ""),
        "run missing model": (["run", "/nonexistent/model", "-o", str(out / "run")], 2, "not found"),
    }


CASE_NAMES = list(_cases(__import__("pathlib").Path("/x")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_one_line_exit_code_no_artifact(case, bad, capsys, monkeypatch):
    argv, code, needle = _cases(bad)[case]
    if case == "build without tensorrt":
        try:
            import tensorrt  # noqa: F401

            pytest.skip("TensorRT is installed here")
        except ImportError:
            pass
    before = set(os.listdir(bad)) | ({p.name for p in (bad / "out").iterdir()} if (bad / "out").exists() else set())
    rc = main(["-q", *argv])
    _, err = capsys.readouterr()
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sq-export {argv[0]}: error:"), lines[0]
    assert needle.lower() in lines[0].lower(), lines[0]
    after = set(os.listdir(bad)) | ({p.name for p in (bad / "out").iterdir()} if (bad / "out").exists() else set())
    assert after == before, f"artifacts left: {after - before}"


def test_norm_that_cannot_be_folded_is_refused(tmp_path, capsys, monkeypatch):
    """A registered family whose norm is Gemma's x·(1+γ): smoothing refuses (exit 4) and writes nothing."""
    import transformers

    from sq_export import families
    from sq_export.families.llama import Llama

    cfg = transformers.GemmaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    m = transformers.GemmaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_()
    d = tmp_path / "gemma"
    m.save_pretrained(d)
    from conftest import tokenizer

    tokenizer().save_pretrained(d)

    class GemmaAsLlama(Llama):
        model_types = ("gemma",)

    monkeypatch.setitem(families.REGISTRY, "gemma", GemmaAsLlama)
    from sq_export.textdata import DEFAULT_CALIB

    (tmp_path / "c.txt").write_text(DEFAULT_CALIB.read_text()[:4000])
    rc = main(["-q", "eval", str(d), "--calib-text", str(tmp_path / "c.txt"), *CAL, "--max-tokens", "64", "--seq-len", "32"])
    err = capsys.readouterr().err
    assert rc == 4 and "cannot be smoothed exactly" in err and len(err.strip().splitlines()) == 1
    rc = main(["-q", "export", str(d), "--calib-text", str(tmp_path / "c.txt"), *CAL, "-o", str(tmp_path / "g.onnx")])
    assert rc == 4 and not (tmp_path / "g.onnx").exists()


def test_debug_shows_traceback(capsys):
    with pytest.raises(Exception):
        main(["--debug", "eval", "/nonexistent/model"])
