"""Device and model type (sq_export.device), on the CPU: the code a GPU runs in float16/bfloat16 runs here in those
types too. Statistics, factors and scales are float32 on the CPU whatever the model's type; where they are exact
(a max of the same values, factors from the same weights, a fold computed in float32 and rounded once) they are
bit-identical across types; the float-equivalence check of smoothing uses a tolerance per type (measured here);
export traces a half model as its exact float32 widening; out-of-memory errors become one line (DoesNotFit)."""

import copy

import numpy as np
import pytest
import torch

from conftest import FAMILIES, make_tiny, token_batches
from sq_export.device import checkpoint_dtype, fits, model_device, resolve_device, resolve_dtype
from sq_export.errors import BackendMissing, BadInput, DoesNotFit, SmoothingChangedOutputs
from sq_export.families import family_for
from sq_export.quant.calibrate import act_max_hook, calibrate
from sq_export.quant.equivalence import (LAYER_TOLERANCE, layer_change, layer_input, layer_outputs_f32,
                                         record_layer_inputs)
from sq_export.quant.reservoir import RowReservoir
from sq_export.quant.smooth import apply_smoothing, smooth_checked, smoothing_factors_for_group

HALF = [torch.bfloat16, torch.float16]


def _half_pair(family, dtype):
    """(half model, float32 model holding exactly the half model's weights)."""
    model, _ = make_tiny(family)
    mh = copy.deepcopy(model).to(dtype)
    return mh, copy.deepcopy(mh).float()


def test_resolve_device_and_dtype(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(BackendMissing, match="--device cpu"):
            resolve_device("cuda")
    with pytest.raises(BadInput):
        resolve_device("tpu")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, torch.bfloat16) == torch.float32  # CPU: float32 whatever the checkpoint
    assert resolve_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16  # GPU: the checkpoint's type
    assert resolve_dtype("auto", cuda, None) == torch.float32  # GGUF / not recorded
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(BadInput, match="--model-dtype"):
        resolve_dtype("int8", cpu)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "torch_dtype": "float16"}')
    assert checkpoint_dtype(tmp_path) == torch.float16
    (tmp_path / "config.json").write_text('{"model_type": "llama", "dtype": "bfloat16"}')
    assert checkpoint_dtype(tmp_path) == torch.bfloat16


def test_load_model_in_a_half_type(tiny_dirs):
    from sq_export import api

    m, _ = api.load_model(tiny_dirs("llama"), device="cpu", dtype="bfloat16", with_tokenizer=False)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert model_device(m) == torch.device("cpu")
    m, _ = api.load_model(tiny_dirs("llama"), device="cpu", with_tokenizer=False)  # auto on the CPU: float32
    assert {p.dtype for p in m.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", HALF)
def test_statistics_are_float32_on_the_cpu_and_exact(dtype):
    """The hook's max of half values equals the max of the same values in float32, bit for bit; the row sample is
    float32 on the CPU and holds the half values exactly."""
    g = torch.Generator().manual_seed(0)
    x32 = (torch.randn(3, 40, 64, generator=g) * 20).to(dtype).float()  # values exactly representable in `dtype`
    sh, s32 = {}, {}
    rh, r32 = RowReservoir({"a"}, rows=16), RowReservoir({"a"}, rows=16)
    for k in range(3):
        act_max_hook("a", sh, rh)(None, (x32[k : k + 1].to(dtype),))
        act_max_hook("a", s32, r32)(None, (x32[k : k + 1],))
    assert sh["a"].dtype == torch.float32 and torch.equal(sh["a"], s32["a"])
    assert rh["a"].dtype == torch.float32 and rh["a"].device.type == "cpu" and torch.equal(rh["a"], r32["a"])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", FAMILIES)
def test_act_scales_half_vs_float32(family, dtype):
    """Calibration of the half model and of its exact float32 widening, same windows: float32 maxima either way.
    They differ by the half model's own arithmetic rounding: at the first norm-fed Linears (one norm after the
    embedding) within 2 ulps of the type; over every Linear within the bounds below (measured 2026-11-29 on these
    models: bfloat16 ≤ 5.5e-2, float16 ≤ 8.4e-3 relative)."""
    mh, mr = _half_pair(family, dtype)
    b = token_batches(8, 32)
    ah, ar = calibrate(mh, family_for(mh), b), calibrate(mr, family_for(mr), b)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in ah.values())
    rel = {n: float(((ah[n] - ar[n]).abs() / ar[n].abs().clamp(min=1e-6)).max()) for n in ar}
    eps = torch.finfo(dtype).eps
    first = family_for(mr).groups()[0].linears
    assert max(rel[n] for n in first) <= 2 * eps, rel
    assert max(rel.values()) <= (0.1 if dtype == torch.bfloat16 else 0.02), rel


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", FAMILIES)
def test_factors_and_folds_exact_across_dtypes(family, dtype):
    """Same act maxima, same weight values: the half model's smoothing factors equal the float32 model's bit for
    bit (float32 on the CPU from exact max|W|), and each folded weight is the float32 fold rounded once (norm
    folds: one fold per weight; with pairs too, a v/up producer row is folded twice, so it is rounded twice: the
    factors still agree bit for bit, the weights to one ulp)."""
    for pairs in (False, True):
        mh, mr = _half_pair(family, dtype)
        fh, fr = family_for(mh), family_for(mr)
        act = calibrate(mr, fr, token_batches(4, 32))
        sh = apply_smoothing(mh, fh, act, 0.6, linear_pairs=pairs)
        sr = apply_smoothing(mr, fr, act, 0.6, linear_pairs=pairs)
        assert sh.keys() == sr.keys() and all(torch.equal(sh[k], sr[k]) and sh[k].dtype == torch.float32 for k in sr)
        ph, pr = dict(mh.named_parameters()), dict(mr.named_parameters())
        for k in pr:
            assert ph[k].dtype == dtype, k
            if not pairs:
                assert torch.equal(ph[k], pr[k].to(dtype)), k
            else:
                fi = torch.finfo(dtype)
                ulp = fi.eps * pr[k].abs() + fi.tiny * fi.eps  # one ulp (subnormals: the smallest step)
                assert ((ph[k].float() - pr[k]).abs() <= ulp).all(), k


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_check_separates_correct_from_wrong_folds(family):
    """The per-layer float32 check (quant.equivalence) of each type: correct norm + pair folds stay under
    LAYER_TOLERANCE by ≥ 2x (≥ 4x on the first five families; Gemma-3's post-norms and Phi-3's fused rows measured
    2.2e-2 in bfloat16 and 2.7e-3 in float16), a wrong fold exceeds it by ≥ 4x (the measured values are in its comment). The
    logits could not do this for half models: on these models the bfloat16 logits move by up to 6.4e-2 of their
    scale under a correct fold and by 0.10 under a wrong one (BLOOM)."""
    x = torch.as_tensor(token_batches(2, 32, seed=3))
    for dtype in [torch.float32, *HALF]:
        mh, mr = _half_pair(family, dtype)
        fam = family_for(mh)
        act = calibrate(mr, family_for(mr), token_batches(8, 32))
        inputs = record_layer_inputs(mh, fam, x)
        ref = layer_outputs_f32(mh, fam, inputs)
        good, bad = copy.deepcopy(mh), copy.deepcopy(mh)
        apply_smoothing(good, family_for(good), act, fam.default_alpha, linear_pairs=True)
        g = family_for(bad).groups()[0]
        s = smoothing_factors_for_group(bad, g, act, fam.default_alpha)
        with torch.no_grad():
            bad.get_submodule(g.source).weight.copy_(bad.get_submodule(g.source).weight.float() / s)
        tol = LAYER_TOLERANCE[dtype]

        def change(m):
            new = layer_outputs_f32(m, family_for(m), inputs)
            return max(layer_change(r, n, layer_input(*i)) for r, n, i in zip(ref, new, inputs))

        assert change(good) <= tol / 2, (dtype, change(good))
        assert change(bad) >= 4 * tol, (dtype, change(bad))
    # and through smooth_checked: a half model is checked per layer, a wrong fold is refused
    mh, mr = _half_pair(family, torch.bfloat16)
    act = calibrate(mr, family_for(mr), token_batches(8, 32))
    factors, worst = smooth_checked(mh, family_for(mh), act, family_for(mh).default_alpha, x, linear_pairs=True)
    assert 0 < worst <= LAYER_TOLERANCE[torch.bfloat16] / 2 and factors
    from sq_export.quant import smooth

    mh, _ = _half_pair(family, torch.bfloat16)
    orig = smooth.fold_into_norm
    try:  # a fold that forgets the Linears
        smooth.fold_into_norm = lambda norm, linears, s, form="gamma": orig(norm, [], s, form)
        with pytest.raises(SmoothingChangedOutputs, match="decoder layer 0"):
            smooth_checked(mh, family_for(mh), act, family_for(mh).default_alpha, x)
    finally:
        smooth.fold_into_norm = orig


@pytest.mark.parametrize("dtype", HALF)
def test_qlinear_of_a_half_model_computes_in_float32(dtype):
    """A QLinear over half weights quantizes (by division, as ONNX QuantizeLinear) and multiplies in float32 (as
    an INT8 GEMM rescales in float32) and rounds the result to the model's type once."""
    from sq_export.quant.qlinear import QLinear, qdq_exact

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(dtype)
    lin32 = copy.deepcopy(lin).float()
    x = (torch.randn(2, 5, 64) * 3).to(dtype)
    qh, q32 = QLinear(lin, "static", 0.05), QLinear(lin32, "static", 0.05)
    assert torch.equal(qh.w_scale, q32.w_scale)
    with torch.no_grad():
        yh = qh(x)
        want = qdq_exact(x.float(), 0.05) @ qdq_exact(q32.w_kn, q32.w_scale) + lin32.bias
    assert yh.dtype == dtype and torch.equal(yh, want.to(dtype))


def test_export_of_a_half_model_is_its_float32_widening(tmp_path):
    """A bfloat16 model, quantized (the paper recipe; smoothing checked per layer in float32), exports the same ONNX
    bytes as the same prepared model widened to float32, and is bfloat16 again afterwards; the INT8 weights of its
    --weights int8 graph are exactly those its QLinears compute with; ONNX Runtime's logits match the model's."""
    import onnx
    from onnx import numpy_helper

    from sq_export import api
    from sq_export.measure.perplexity import ort_session
    from sq_export.quant.qlinear import QLinear

    mh, _ = _half_pair("llama", torch.bfloat16)
    ids = token_batches(1, 600, seed=5)[0]
    calib = api.calibrate(mh, None, ids, samples=4, seq_len=32, rows=None)
    assert all(v.dtype == torch.float32 for v in calib.act_max.values())
    qm = api.quantize(mh, calib, api.Recipe.paper())
    wide = copy.deepcopy(qm)
    wide.model.float()
    a, b, c = tmp_path / "half.onnx", tmp_path / "wide.onnx", tmp_path / "half8.onnx"
    api.export_onnx(qm, a, weights="qdq")
    api.export_onnx(wide, b, weights="qdq")
    assert a.read_bytes() == b.read_bytes()
    assert {p.dtype for p in qm.model.parameters()} == {torch.bfloat16}
    api.export_onnx(qm, c, weights="int8")
    int8 = [numpy_helper.to_array(t) for t in onnx.load(str(c)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    for name, m in qm.model.named_modules():
        if isinstance(m, QLinear):
            q = torch.clamp(torch.round(m.w_kn.float() / m.w_scale), -128, 127).to(torch.int8).numpy()
            assert any(t.shape == q.shape and np.array_equal(t, q) for t in int8), name
    x = torch.as_tensor(token_batches(1, 16, seed=9))
    with torch.no_grad():
        rh = qm.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits.float().numpy()
    got = ort_session(str(a)).run(["logits"], {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy())})[0]
    assert np.abs(got - rh).mean() < 2e-2 * np.abs(rh).max()  # the bfloat16 model's own rounding included


# ----- out of memory ----------------------------------------------------------------------------------------------
def _oom(*a, **k):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")


def test_fits_turns_out_of_memory_into_one_line():
    with pytest.raises(DoesNotFit) as e:
        with fits("decoder layer 3", "cuda"):
            _oom()
    msg = str(e.value)
    assert "\n" not in msg and "decoder layer 3 does not fit on cuda" in msg
    assert "--device cpu" in msg and "max_memory" in msg and "stream" in msg
    assert e.value.exit_code == 2
    with pytest.raises(ValueError):  # other errors pass through unchanged
        with fits("x", "cuda"):
            raise ValueError("not memory")
    with pytest.raises(DoesNotFit, match="in host memory|on cpu"):
        with fits("the model", "cpu"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def test_calibration_out_of_memory_is_a_clear_cli_error(tiny_dirs, monkeypatch, capsys, tmp_path):
    """A (fake) CUDA out-of-memory error in a decoder layer's forward during `sq-export calibrate`: exit 2, one line
    naming what to change, no traceback, nothing written."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sq_export.cli import main

    monkeypatch.setattr(LlamaDecoderLayer, "forward", _oom)
    rc = main(["-q", "calibrate", str(tiny_dirs("llama")), "--device", "cpu", "--samples", "2", "--calib-seq-len", "16",
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "does not fit" in err and "--device cpu" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "act_scales.safetensors").exists()


def test_trace_device_refusals(tiny_dirs, tmp_path, capsys):
    """--trace-device cuda: only the float32 logits graph; without a GPU, exit 3 naming the option, no file."""
    from sq_export import api
    from sq_export.cli import main

    m, _ = api.load_model(tiny_dirs("llama"), device="cpu", with_tokenizer=False)
    with pytest.raises(BadInput, match="--trace-device"):
        api.export_onnx(m, tmp_path / "d.onnx", decode=True, trace_device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(BackendMissing, match="--trace-device cuda"):
            api.export_onnx(m, tmp_path / "x.onnx", trace_device="cuda")
        capsys.readouterr()
        code = main(["-q", "export", str(tiny_dirs("llama")), "--mode", "fp", "-o", str(tmp_path / "y.onnx"), "--trace-device", "cuda"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 3 and len(err) == 1 and "--trace-device" in err[0] and not (tmp_path / "y.onnx").exists()
    assert not list(tmp_path.iterdir())
