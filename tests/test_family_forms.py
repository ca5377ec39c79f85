"""What the newer adapters declare beyond norm → Linears: Gemma's (1+γ) norms (norm_form "one_plus_gamma"),
pairs on row slices of fused producers (Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's per-head interleaved
query_key_value), GPT-NeoX's sequential residual form, and attention with Gemma 3's own score scaling."""

import copy

import pytest
import torch

from conftest import make_tiny, token_batches
from sq_export.quant.calibrate import calibrate
from sq_export.errors import NotFoldable
from sq_export.modeling import check_plain_norm
from sq_export.quant.smooth import apply_smoothing, fold_into_linear, fold_into_norm, logits_of, smoothed_act_max


def _gemma_norm(n=16, seed=0):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = torch.Generator().manual_seed(seed)
    norm = Gemma3RMSNorm(n)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=g) * 3)  # real Gemma 3 gains reach 1+γ ≈ 40 (and below 0)
    return norm, g


def test_one_plus_gamma_fold_divides_the_norm_output():
    norm, g = _gemma_norm()
    x = torch.randn(2, 5, 16, generator=g) * 7
    s = torch.rand(16, generator=g) * 20 + 0.05
    with torch.no_grad():
        ref = norm(x)
        check_plain_norm(norm, "gemma", "one_plus_gamma")
        fold_into_norm(norm, [], s, "one_plus_gamma")
        got = norm(x)
    torch.testing.assert_close(got, ref / s, rtol=2e-6, atol=1e-6 * float(ref.abs().max()))


def test_norm_form_must_match_the_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gemma, _ = _gemma_norm()
    with pytest.raises(NotFoldable, match="1\\+γ"):
        check_plain_norm(gemma, "layers.0.input_layernorm", "gamma")
    llama = LlamaRMSNorm(16)
    with torch.no_grad():
        llama.weight.normal_()
    check_plain_norm(llama, "layers.0.input_layernorm", "gamma")
    with pytest.raises(NotFoldable, match="one_plus_gamma"):
        check_plain_norm(llama, "layers.0.input_layernorm", "one_plus_gamma")
    with pytest.raises(ValueError):
        check_plain_norm(llama, "x", "gamma_plus_one")


def test_gemma3_lm_head_fold_uses_the_family_form():
    from sq_export.quant.lm_head import quantize_lm_head

    model, fam = make_tiny("gemma3")
    assert fam.norm_form == "one_plus_gamma"
    ids = token_batches(n=2, seq=16)
    with pytest.raises(NotFoldable):
        quantize_lm_head(copy.deepcopy(model), ids, batch_size=2, alpha=0.5)  # as if its norms were γ·f(x)
    r = quantize_lm_head(model, ids, batch_size=2, alpha=0.5, norm_form=fam.norm_form)
    assert r["smoothed_into"] == "model.norm"


def _pair_group(fam, producer_suffix):
    return next(g for g in fam.groups(include_linear_pairs=True) if g.kind == "linear" and g.source.endswith(producer_suffix))


def test_phi3_pairs_change_only_their_row_slice():
    model, fam = make_tiny("phi3")
    c = model.config
    am = calibrate(model, fam, token_batches(4, 32))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.as_tensor(token_batches(2, 40, seed=3))
    ref = logits_of(model, x)
    apply_smoothing(model, fam, am, 0.85, linear_pairs=True)
    assert float((logits_of(model, x) - ref).abs().max()) <= 2e-4 * max(1.0, float(ref.abs().max()))
    i, h, kv, d = c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    for layer in range(fam.num_layers()):
        p = f"model.layers.{layer}."
        gu0, gu1 = before[p + "mlp.gate_up_proj.weight"], model.get_submodule(p + "mlp.gate_up_proj").weight
        qkv0, qkv1 = before[p + "self_attn.qkv_proj.weight"], model.get_submodule(p + "self_attn.qkv_proj").weight
        s_norm = model.get_submodule(p + "post_attention_layernorm").weight / before[p + "post_attention_layernorm.weight"]
        s_in = model.get_submodule(p + "input_layernorm").weight / before[p + "input_layernorm.weight"]
        # gate rows: only the norm's factor (input columns ×s); up rows: that and their own 1/s_pair per row
        torch.testing.assert_close(gu1[:i], gu0[:i] / s_norm.view(1, -1))
        assert not torch.allclose(gu1[i:], gu0[i:] / s_norm.view(1, -1))
        # q and k rows: only the input_layernorm factor; v rows also divided by the pair factor
        torch.testing.assert_close(qkv1[: h * d + kv * d], qkv0[: h * d + kv * d] / s_in.view(1, -1))
        assert not torch.allclose(qkv1[h * d + kv * d :], qkv0[h * d + kv * d :] / s_in.view(1, -1))
    assert _pair_group(fam, "gate_up_proj").rows == ((i, 2 * i),)
    assert _pair_group(fam, "qkv_proj").rows == ((h * d + kv * d, h * d + 2 * kv * d),) and _pair_group(fam, "qkv_proj").kv_repeat == h // kv


def _fold_pair_rows(model, fam, rows, s_by_layer):
    m = copy.deepcopy(model)
    for layer, s in enumerate(s_by_layer):
        p = f"{fam.layer_prefix(layer)}attention."
        fold_into_linear(m.get_submodule(p + "query_key_value"), m.get_submodule(p + "dense"), s, rows=rows)
    return m


@pytest.mark.parametrize("family", ["gpt_neox", "gpt_neox_seq"])
def test_neox_v_rows_are_interleaved_per_head(family):
    """query_key_value's rows are [q_h; k_h; v_h] per head: folding into the declared v rows is exact, folding the
    same factors into the q or k rows of each head, or into the last third of the rows (a non-interleaved [q; k; v]
    reading), is not."""
    model, fam = make_tiny(family)
    assert model.config.use_parallel_residual == (family == "gpt_neox")
    h, hid = model.config.num_attention_heads, model.config.hidden_size
    d = hid // h
    rows = _pair_group(fam, "query_key_value").rows
    assert rows == tuple((3 * d * i + 2 * d, 3 * d * i + 3 * d) for i in range(h))
    g = torch.Generator().manual_seed(0)
    s = [torch.rand(hid, generator=g) * 8 + 0.1 for _ in range(fam.num_layers())]
    x = torch.as_tensor(token_batches(2, 24, seed=4))
    ref = logits_of(model, x)
    tol = 2e-4 * max(1.0, float(ref.abs().max()))
    assert float((logits_of(_fold_pair_rows(model, fam, rows, s), x) - ref).abs().max()) <= tol
    for wrong in (tuple((a - d, b - d) for a, b in rows), tuple((a - 2 * d, b - 2 * d) for a, b in rows), ((2 * hid, 3 * hid),)):
        assert float((logits_of(_fold_pair_rows(model, fam, wrong, s), x) - ref).abs().max()) > 100 * tol


def test_gpt_neox_sequential_residual_smooths_exactly_and_helps():
    model, fam = make_tiny("gpt_neox_seq")
    am = calibrate(model, fam, token_batches(8, 32))
    x = torch.as_tensor(token_batches(4, 32))
    ref = logits_of(model, x)
    m = copy.deepcopy(model)
    factors = apply_smoothing(m, fam, am, fam.default_alpha, linear_pairs=True)
    assert float((logits_of(m, x) - ref).abs().max()) <= 2e-4 * max(1.0, float(ref.abs().max()))
    again = calibrate(m, fam, token_batches(8, 32))
    pred = smoothed_act_max(am, fam, factors, True)
    for n in fam.quantized_linears():
        torch.testing.assert_close(again[n], pred[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "phi3", "gpt_neox"])
def test_attention_interface_calibration_mode_is_exactly_eager(family):
    """sq_attention_forward with the INT8 points off computes what the model's eager attention computes: Gemma 3's
    query_pre_attn_scalar**-0.5 scaling (not head_dim**-0.5; the tiny config makes them differ) and sliding mask
    included."""
    from sq_export.quant import attention as A
    model, fam = make_tiny(family)
    if family == "gemma3":
        assert model.config.query_pre_attn_scalar != model.config.head_dim
    x = torch.as_tensor(token_batches(2, 24, seed=6))
    ref = logits_of(model, x)
    A.calibrate_attention(model, fam, token_batches(n=2, seq=16))
    assert model.config._attn_implementation == A.ATTN_IMPL
    torch.testing.assert_close(logits_of(model, x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_softcap_as_the_eager_function():
    """A model that passes `softcap` (Gemma 2 style) gets the same tanh capping of the scores as its eager path."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from sq_export.quant.attention import sq_attention_forward

    class M(torch.nn.Module):
        num_key_value_groups = 2
        head_dim = 8

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, generator=g) * 4
    k, v = torch.randn(1, 2, 5, 8, generator=g) * 4, torch.randn(1, 2, 5, 8, generator=g)
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)[None, None]
    for cap in (None, 2.0):
        a = eager_attention_forward(M().eval(), q, k, v, mask, scaling=0.3, softcap=cap)
        b = sq_attention_forward(M().eval(), q, k, v, mask, scaling=0.3, softcap=cap)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
