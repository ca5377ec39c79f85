"""Issue 17: the outlier prefix (sq_export.quant.prefix, PrefixQuant) in PyTorch: exact in float for every family,
decoding continues after it, calibration leaves the prefix's activations out, `auto` finds an injected outlier
token, prepare recomputes the prefix's cache after pair smoothing."""

import numpy as np
import pytest
import torch

from conftest import FAMILIES, make_tiny, token_batches
from sq_export.errors import BadInput
from sq_export.quant import prefix as P
from sq_export.quant.recipe import CalibOptions, make_recipe, parse_prefix

PREFIX = [1, 7, 9]


def _logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False, **kw).logits


@pytest.mark.parametrize("spec,want", [
    (None, None), ("none", None), ("0", None), ("auto", ("auto", None)), ("3", ("n", 3)), (2, ("n", 2)),
    ("ids:1", ("ids", [1])), ("1,198", ("ids", [1, 198])), ("ids:1, 198", ("ids", [1, 198])), ("text:\n", ("text", "\n")),
])
def test_parse_prefix(spec, want):
    assert parse_prefix(spec) == want


@pytest.mark.parametrize("spec", ["ids:", "ids:a", "nonsense", "text:"])
def test_parse_prefix_refuses(spec):
    with pytest.raises(BadInput):
        parse_prefix(spec)
    with pytest.raises(BadInput):
        make_recipe("default", prefix_outliers=spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_equals_running_the_tokens_first(family):
    model, _ = make_tiny(family)
    x = torch.as_tensor(token_batches(3, 16, seed=1))
    full = _logits(model, torch.cat([torch.tensor([PREFIX] * 3), x], 1))[:, len(PREFIX):]
    pre = P.compute_prefix(model, PREFIX)
    assert len(pre) == 3 and pre.keys[0].shape[0] == 1 and pre.keys[0].shape[2] == 3
    with P.applied(model, pre):
        a = _logits(model, x, attention_mask=torch.ones_like(x))
        b = _logits(model, x)
    assert a.shape == (3, 16, model.config.vocab_size)  # the prefix positions are not part of the output
    torch.testing.assert_close(a, full, atol=2e-5, rtol=0)
    torch.testing.assert_close(b, full, atol=2e-5, rtol=0)
    assert P.installed(model) is None  # applied() restores
    assert (_logits(model, x) - full).abs().max() > 1e-3  # and without it the logits differ


def test_prefix_with_positions_and_decoding_continues_after_it():
    from transformers import DynamicCache

    model, _ = make_tiny("llama")
    x = torch.as_tensor(token_batches(2, 12, seed=2))
    full = _logits(model, torch.cat([torch.tensor([PREFIX] * 2), x], 1))[:, 3:]
    pre = P.compute_prefix(model, PREFIX)
    with P.applied(model, pre), torch.no_grad():
        c = _logits(model, x, position_ids=torch.arange(12)[None].expand(2, 12))  # callers' positions count their tokens
        cache = DynamicCache()  # an empty cache gets the prefix filled in
        o1 = model(input_ids=x[:, :8], attention_mask=torch.ones(2, 8, dtype=torch.long), past_key_values=cache, use_cache=True)
        cache = o1.past_key_values
        assert cache.get_seq_length() == 3 + 8
        o2 = model(input_ids=x[:, 8:], attention_mask=torch.ones(2, 12, dtype=torch.long), past_key_values=cache, use_cache=True)
    torch.testing.assert_close(c, full, atol=2e-5, rtol=0)
    torch.testing.assert_close(o1.logits, full[:, :8], atol=2e-5, rtol=0)
    torch.testing.assert_close(o2.logits, full[:, 8:], atol=2e-5, rtol=0)


def test_a_float_model_with_a_prefix_takes_no_statistics(monkeypatch):
    """`--mode fp --prefix-outliers ...` needs the prefix (its tokens and float KV cache), not the maxima: no pass
    over the calibration windows (it took minutes on SmolLM2's 512 default windows), the same prefix as a quantized
    recipe's calibration chooses; calibrate_for asks for no statistics exactly when the recipe is float."""
    from sq_export.quant import calibrate as C
    from sq_export.quant.recipe import make_recipe

    model, fam = make_tiny("llama")
    ids = token_batches(1, 600, seed=4)[0]
    opts = CalibOptions(None, 4, 32)
    full = C.calibrate_ids(model, fam, ids, opts, prefix=("auto", None))
    calls = []
    monkeypatch.setattr(C, "calibrate", lambda *a, **k: calls.append(1) or {})
    cal = C.calibrate_ids(model, fam, ids, opts, prefix=("auto", None), stats=False)
    assert not calls and cal.act_max == {} and cal.prefix.tokens == full.prefix.tokens and full.act_max
    for a, b in zip(cal.prefix.keys + cal.prefix.values, full.prefix.keys + full.prefix.values):
        torch.testing.assert_close(a, b)
    seen = []
    monkeypatch.setattr("sq_export.textdata.token_ids", lambda *a, **k: ids)
    monkeypatch.setattr(C, "calibrate_ids", lambda *a, **k: seen.append(k["stats"]))
    for preset in ("fp", "default"):
        C.calibrate_for(model, fam, None, make_recipe(preset, calib=opts, prefix_outliers="auto"))
    assert seen == [False, True]


def test_calibration_leaves_the_prefix_activations_out():
    from sq_export.quant.calibrate import calibrate_ids

    model, fam = make_tiny("llama")
    ids = token_batches(1, 600, seed=4)[0]
    opts = CalibOptions(None, 4, 32)
    cal = calibrate_ids(model, fam, ids, opts, prefix=("ids", PREFIX))
    assert cal.prefix.tokens == PREFIX and P.installed(model) is None
    # reference: the windows run after the prefix tokens, maxima over the windows' own positions only
    from sq_export.textdata import calibration_samples

    w = torch.as_tensor(calibration_samples(ids, 4, 32))
    ref, hooks = {}, []
    for n in fam.quantized_linears():
        def fn(_m, a, n=n):
            v = a[0][:, len(PREFIX):].abs().reshape(-1, a[0].shape[-1]).amax(0)
            ref[n] = v if n not in ref else torch.maximum(ref[n], v)
        hooks.append(model.get_submodule(n).register_forward_pre_hook(fn))
    with torch.no_grad():
        model(input_ids=torch.cat([torch.tensor([PREFIX] * 4), w], 1), use_cache=False)
    for h in hooks:
        h.remove()
    for n in fam.quantized_linears():
        torch.testing.assert_close(cal.act_max[n], ref[n], atol=1e-4, rtol=1e-4)
    plain = calibrate_ids(model, fam, ids, opts)
    assert any(not torch.allclose(plain.act_max[n], cal.act_max[n]) for n in fam.quantized_linears())


def _outlier_token_model(T=77, c=5):
    """Tiny Llama in which token T (and only it) drives a down_proj input channel far above every other token."""
    model, fam = make_tiny("llama", outliers=False)
    with torch.no_grad():
        e = model.get_input_embeddings().weight
        e[:, c] = 0
        e[T] = 0
        e[T, c] = 100.0
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:, c] *= 30
            layer.mlp.up_proj.weight[:, c] *= 30
    return model, fam


def test_auto_chooses_the_frequent_outlier_token_then_bos():
    model, fam = _outlier_token_model()
    w = token_batches(8, 64, seed=3)
    w[w == 77] = 78
    rng = np.random.default_rng(0)
    for k in range(8):
        w[k, rng.choice(np.arange(1, 64), 2, replace=False)] = 77
    tokens, info = P.choose_tokens(model, fam, w, ("auto", None))
    assert tokens == [77, model.config.bos_token_id], info
    assert info["n_auto"] == 2 and info["frequent_outlier_ids"][0] == [77, 32]
    tokens, _ = P.choose_tokens(model, fam, w, ("n", 1))
    assert tokens == [model.config.bos_token_id]


def test_prepare_recomputes_the_prefix_after_pair_smoothing():
    from sq_export import api
    from sq_export.quant.calibrate import calibrate_ids

    model, fam = make_tiny("llama")
    ids = token_batches(1, 800, seed=6)[0]
    opts = CalibOptions(None, 4, 32)
    cal = calibrate_ids(model, fam, ids, opts, rows=64, prefix=("ids", PREFIX))
    r = make_recipe("default", calib=opts, fallback="none", prefix_outliers="ids:1,7,9")
    qm = api.quantize(model, cal, r, copy=True)  # the float-equivalence check runs with the prefix: refuses if stale
    pre = qm.prepared.prefix
    assert pre is not cal.prefix and P.installed(qm.model) is pre and P.installed(model) is None
    for k0, k1, v0, v1 in zip(cal.prefix.keys, pre.keys, cal.prefix.values, pre.values):
        torch.testing.assert_close(k0, k1, atol=1e-5, rtol=1e-5)  # keys: q/k/v smoothing is exact
        assert not torch.allclose(v0, v1)  # values: v→o pair smoothing divides v_proj's rows
    assert qm.summary()["prefix_outliers"]["tokens"] == PREFIX
    x = torch.as_tensor(token_batches(2, 16, seed=8))
    assert _logits(qm.model, x).shape == (2, 16, model.config.vocab_size)
    # the recipe and the calibration must agree
    with pytest.raises(BadInput):
        api.quantize(model, cal, make_recipe("default", calib=opts, fallback="none"), copy=True)
    with pytest.raises(BadInput):
        api.quantize(model, calibrate_ids(model, fam, ids, opts, rows=64), r, copy=True)


def test_eval_and_export_cli_with_a_prefix(tiny_dirs, small_text, tmp_path, capsys):
    import json

    from sq_export.cli import main

    d = str(tiny_dirs("llama"))
    common = ["--calib-text", str(small_text / "calib.txt"), "--samples", "4", "--calib-seq-len", "32",
              "--text", str(small_text / "eval.txt"), "--max-tokens", "256", "--seq-len", "64", "--json"]
    out = {}
    for mode in ("fp", "sq"):
        code = main(["-q", "eval", d, "--mode", mode, "--prefix-outliers", "auto", "--fallback", "none", *common])
        o, err = capsys.readouterr()
        assert code == 0, err
        out[mode] = json.loads(o.strip().splitlines()[-1])
        assert out[mode]["prefix_outliers"]["tokens"][-1] == 1  # auto ends with BOS (<s> of the test tokenizer)
    assert out["fp"]["tokens"] == out["sq"]["tokens"] == 252  # the prefix positions are not scored
    code = main(["-q", "export", d, "-o", str(tmp_path / "x.onnx"), "--prefix-outliers", "auto", "--fallback", "none",
                 "--calib-text", str(small_text / "calib.txt"), "--samples", "4", "--calib-seq-len", "32", "--json"])
    o, err = capsys.readouterr()
    assert code == 0, err
    assert main(["-q", "check", str(tmp_path / "x.onnx"), "--json"]) == 0
    capsys.readouterr()
    code = main(["-q", "eval", str(tmp_path / "x.onnx"), "--text", str(small_text / "eval.txt"), "--max-tokens", "256",
                 "--seq-len", "64", "--json"])
    o, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(o.strip().splitlines()[-1])
    assert r["tokens"] == 252 and abs(r["perplexity"] - out["sq"]["perplexity"]) < 0.05 * out["sq"]["perplexity"]


def test_rotation_is_float_exact_and_unties_the_head():
    from sq_export.quant.rotate import hadamard_matrix, random_orthogonal, rotate_model

    for n in (64, 576, 12, 96):
        h = hadamard_matrix(n)
        assert h is not None and (h @ h.T == n * np.eye(n)).all()
        q = random_orthogonal(n, 3)
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))
    model, fam = make_tiny("llama")
    model.lm_head.weight = model.get_input_embeddings().weight  # tied, as SmolLM2
    x = torch.as_tensor(token_batches(2, 16, seed=1))
    ref = _logits(model, x)
    info = rotate_model(model, fam, seed=0, check_batch=x)
    assert info["kind"] == "hadamard" and info["delta"] < 1e-4
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(_logits(model, x), ref, atol=1e-4, rtol=0)
    assert all(float(model.get_submodule(g.source).weight.min()) >= 0 for g in fam.groups())  # γ folded: norms are 1
    from sq_export.errors import UnsupportedModel

    with pytest.raises(UnsupportedModel):
        rotate_model(*make_tiny("opt"))
