"""The torch side on a CUDA GPU (skipped without one; run on the lent H200): the same code the CPU tests run, with
the model on the GPU in its half type. Act scales of the half model on the GPU vs the float32 model on the CPU
(same weights) within the bounds test_device.py measured on the CPU; streamed calibration on the GPU bit-identical
to whole-model calibration on the GPU; smoothing exact on the GPU; a model split between the GPU and CPU offload by
accelerate (`device_map="auto"` with a small `max_memory`) calibrates and smooths like the resident model; the
perplexity of the float32 model on the GPU within 0.1 % of the CPU's."""

import copy

import pytest
import torch

from conftest import FAMILIES, make_tiny, token_batches
from sq_export import api
from sq_export.families import family_for
from sq_export.quant.calibrate import calibrate
from sq_export.quant.smooth import apply_smoothing, logits_of, smooth_checked

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch (runs on the device)")
HALF = [torch.bfloat16, torch.float16]
SAMPLES, SEQ, BATCH = 8, 64, 4


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", FAMILIES)
def test_act_scales_half_on_gpu_vs_float32_on_cpu(family, dtype):
    model, _ = make_tiny(family)
    mh = copy.deepcopy(model).to(dtype)
    mr = copy.deepcopy(mh).float()  # exactly the half weights, float32, on the CPU
    mh = mh.to("cuda")
    b = token_batches(8, 32)
    ah, ar = calibrate(mh, family_for(mh), b), calibrate(mr, family_for(mr), b)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in ah.values())
    rel = {n: float(((ah[n] - ar[n]).abs() / ar[n].abs().clamp(min=1e-6)).max()) for n in ar}
    assert max(rel.values()) <= (0.1 if dtype == torch.bfloat16 else 0.02), rel


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_on_gpu_matches_cpu(family):
    """float32 on the GPU: act scales within float32 reduction tolerance of the CPU's; smoothing exact there."""
    model, _ = make_tiny(family)
    mg = copy.deepcopy(model).to("cuda")
    b = token_batches(8, 32)
    ag, ac = calibrate(mg, family_for(mg), b), calibrate(model, family_for(model), b)
    rel = max(float(((ag[n] - ac[n]).abs() / ac[n].abs().clamp(min=1e-6)).max()) for n in ac)
    assert rel <= 1e-4, rel
    x = torch.as_tensor(b[:2]).to("cuda")
    smooth_checked(mg, family_for(mg), ag, 0.5, x, linear_pairs=True)  # raises if the float outputs moved


def test_streamed_calibration_on_gpu_is_bit_identical(tiny_dirs, small_text):
    folder = str(tiny_dirs("llama"))
    model, tok = api.load_model(folder, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    text = small_text / "calib.txt"
    whole = api.calibrate(model, tok, text, samples=SAMPLES, seq_len=SEQ, batch_size=BATCH, rows=64)
    streamed = api.calibrate_streamed(folder, tok, text, samples=SAMPLES, seq_len=SEQ, batch_size=BATCH, rows=64, device="cuda")
    assert sorted(whole.act_max) == sorted(streamed.act_max)
    for k in whole.act_max:
        assert torch.equal(whole.act_max[k], streamed.act_max[k]), k


def test_gpu_and_cpu_offload_split_calibrates_and_smooths(tiny_dirs):
    """accelerate's dispatch with a max_memory too small for the whole model on the GPU: some layers offloaded to
    CPU RAM; calibration and the exact-smoothing check work on it as on the model resident on the GPU."""
    folder = str(tiny_dirs("llama"))
    plain, _ = api.load_model(folder, device="cuda", dtype="float32", with_tokenizer=False)
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    split, _ = api.load_model(folder, device="cuda", dtype="float32", with_tokenizer=False, device_map="auto",
                              max_memory={0: int(size * 0.5), "cpu": 10 * 2**30})
    where = set(getattr(split, "hf_device_map", {}).values())
    assert "cpu" in where and (0 in where or "cuda:0" in where), where
    b = token_batches(4, 32)
    fam, fam_p = family_for(split), family_for(plain)
    act, act_p = calibrate(split, fam, b), calibrate(plain, fam_p, b)
    rel = max(float(((act[n] - act_p[n]).abs() / act_p[n].abs().clamp(min=1e-6)).max()) for n in act_p)
    assert rel <= 1e-4, rel
    x = torch.as_tensor(b[:2]).to("cuda")
    smooth_checked(split, fam, act, 0.6, x, linear_pairs=True)
    apply_smoothing(plain, fam_p, act_p, 0.6, linear_pairs=True)
    assert torch.allclose(logits_of(split, x).float().cpu(), logits_of(plain, x).float().cpu(), rtol=1e-3, atol=1e-3)


def test_perplexity_gpu_vs_cpu_within_a_tenth_of_a_percent(tiny_dirs, small_text):
    folder = str(tiny_dirs("llama"))
    text = small_text / "eval.txt"
    mc, tok = api.load_model(folder, device="cpu")
    mg, _ = api.load_model(folder, device="cuda", dtype="float32")
    pc = api.perplexity(mc, tok, text, seq_len=128, max_tokens=1024)["perplexity"]
    pg = api.perplexity(mg, tok, text, seq_len=128, max_tokens=1024)["perplexity"]
    assert abs(pg / pc - 1) < 1e-3, (pc, pg)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_export_traced_on_the_gpu_gives_the_cpu_trace_bytes(tiny_dirs, small_text, tmp_path, dtype):
    """export_onnx(trace_device="cuda"): the float32 copy for the trace lives on the GPU (host memory holds one
    tensor at a time while writing); the graph is the CPU trace's, byte for byte (qdq16 too)."""
    folder = str(tiny_dirs("llama"))
    model, tok = api.load_model(folder, device="cuda", dtype=dtype)
    r = api.make_recipe("paper", calib=api.CalibOptions(str(small_text / "calib.txt"), 4, 64))
    qm = api.quantize(model, recipe=r, tokenizer=tok)
    for w in ("qdq", "qdq16"):
        a, b = tmp_path / f"cpu_{w}.onnx", tmp_path / f"gpu_{w}.onnx"
        api.export_onnx(qm, a, weights=w)
        api.export_onnx(qm, b, weights=w, trace_device="cuda")
        assert a.read_bytes() == b.read_bytes(), w
    assert next(qm.model.parameters()).device.type == "cuda"  # put back where it was


def test_outlier_prefix_on_the_gpu(tiny_dirs, small_text, tmp_path):
    """The outlier prefix with the model on the GPU (2026-11-30 lease: `export --prefix-outliers auto --device cuda`
    fed CPU token ids to the GPU model when choosing the tokens): the tokens chosen and the prefix's KV cache as on
    the CPU (float32 both), and the CLI's every-Linear-INT8 prefix export with `--alpha kl`, prefill and decode."""
    from sq_export.cli import main
    from sq_export.onnxio.meta import read_metadata
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.recipe import parse_prefix

    folder = str(tiny_dirs("llama"))
    mc, tok = api.load_model(folder, device="cpu")
    mg, _ = api.load_model(folder, device="cuda", dtype="float32")
    b = token_batches(8, 32)
    got = {}
    for dev, m in (("cpu", mc), ("cuda", mg)):
        tokens, _ = prefix_mod.choose_tokens(m, family_for(m), b, parse_prefix("auto"), tok)
        got[dev] = prefix_mod.compute_prefix(m, tokens, tok)
        with prefix_mod.applied(m, got[dev]):  # a forward after the prefix, on the model's device
            m(input_ids=torch.as_tensor(b[:2]).to(dev))
    assert got["cpu"].tokens == got["cuda"].tokens
    for kc, kg in zip(got["cpu"].keys + got["cpu"].values, got["cuda"].keys + got["cuda"].values):
        assert kg.device.type == "cuda" and torch.allclose(kc, kg.cpu(), rtol=1e-4, atol=1e-5)
    for dec in ([], ["--decode"]):
        out = tmp_path / f"kl{len(dec)}.onnx"
        assert main(["-q", "export", folder, "--weights", "qdq", "--prefix-outliers", "auto", "--alpha", "kl", "--smooth-pairs",
                     "--fallback", "none", "--device", "cuda", "--calib-text", str(small_text / "calib.txt"), "--samples", "4",
                     "--calib-seq-len", "64", "-o", str(out), *dec]) == 0
        assert read_metadata(out)["prefix_outliers"] == ",".join(map(str, got["cpu"].tokens))


def test_rotate_down_on_the_gpu_matches_the_cpu(tiny_dirs, small_text):
    """--rotate-down with the model on the GPU (float32): the rotated ranges and the quantized model's logits as on
    the CPU; in float16 a rotated QLinear computes in float32 (rotation, fake quantization, matmul), as the graph's
    INT8 GEMM does, then casts to float16."""
    from sq_export.quant.hadamard import block_rotate
    from sq_export.quant.qlinear import qdq_exact

    folder = str(tiny_dirs("llama"))
    got = {}
    for dev, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "float16")):
        model, tok = api.load_model(folder, device=dev, dtype=dtype)
        calib = api.calibrate(model, tok, small_text / "calib.txt", samples=4, seq_len=64)
        qm = api.quantize(model, calib, api.Recipe(rotate_down=32, fallback="none"))
        ql = qm.model.get_submodule("model.layers.0.mlp.down_proj")
        assert ql.rot is not None and ql.rot.device.type == dev
        x = calib.check_batch().to(dev)
        with torch.no_grad():
            got[(dev, dtype)] = (qm.model(input_ids=x).logits.float().cpu(), ql.act_scale)
        if dtype == "float16":
            xh = torch.randn(2, 5, ql.in_features, device=dev).to(torch.float16)
            with torch.no_grad():
                want = (qdq_exact(block_rotate(xh.float(), ql.rot), ql.act_scale) @ ql.quantized_weight_float()).to(torch.float16)
                assert torch.equal(ql(xh), want)
    ref, s_ref = got[("cpu", "float32")]
    out, s = got[("cuda", "float32")]
    assert abs(s / s_ref - 1) < 1e-4 and (out - ref).abs().max() < 2e-2 * ref.abs().max()


def test_streamed_rotate_down_on_the_gpu(tiny_dirs, small_text, tmp_path):
    """`--rotate-down` layer-streamed on the GPU (the 7B path): the rotated ranges measured on each smoothed layer
    as on the CPU (float32 both, within reduction order), in float16 within the half-model bounds; the folder's
    export from placeholders carries the rotation."""
    import onnx

    from sq_export.quant.recipe import CalibOptions, make_recipe

    folder = str(tiny_dirs("llama"))
    tok = api.load_tokenizer(folder)
    r = make_recipe("default", calib=CalibOptions(str(small_text / "calib.txt"), SAMPLES, SEQ, BATCH), fallback="none", rotate_down=32,
                    alpha=0.85)  # a fixed α: the search may choose another α per group for the half model
    got, dirs = {}, {}
    for k, (dev, dtype) in enumerate((("cpu", "float32"), ("cuda", "float32"), ("cuda", "float16"))):
        dirs[(dev, dtype)] = tmp_path / f"q{k}"
        got[(dev, dtype)] = api.quantize_streamed(folder, dirs[(dev, dtype)], r, tokenizer=tok, device=dev, dtype=dtype).scales
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    for n in names:
        ref = got[("cpu", "float32")][n]
        assert abs(got[("cuda", "float32")][n] / ref - 1) < 1e-4, n
        assert abs(got[("cuda", "float16")][n] / ref - 1) < 5e-2, n
    out = tmp_path / "g.onnx"
    api.export_onnx(api.load_quantized(dirs[("cuda", "float16")], lazy=True), out, weights="qdq16")
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["sq_export.rotated_linears"] == "2"
    api.check(out).raise_for_violations()
