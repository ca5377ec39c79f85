"""Layer-streamed perplexity (sq_export.stream.perplexity): the whole-model value bit for bit on the CPU in float32,
for the float model and for a quantize_streamed folder (its fake-quantized model), every family."""

from __future__ import annotations

import pytest

from conftest import FAMILIES
from sq_export import api
from sq_export.quant.recipe import CalibOptions, make_recipe


def _calib(small_text):
    return CalibOptions(str(small_text / "calib.txt"), 4, 32, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_perplexity_is_the_whole_models(family, tiny_dirs, small_text, tmp_path):
    folder = tiny_dirs(family)
    model, tok = api.load_model(str(folder), device="cpu")
    text = small_text / "eval.txt"
    # 3 chunks of 40 and a shorter last one: chunks of unequal length are captured one batch each
    kw = dict(seq_len=40, max_tokens=135)
    whole = api.perplexity(model, tok, text, **kw)
    streamed = api.perplexity_streamed(str(folder), tok, text, device="cpu", **kw)
    assert streamed["tokens"] == whole["tokens"] == 135 - 4
    assert streamed["perplexity"] == whole["perplexity"] and not streamed["quantized"]

    r = make_recipe("default", calib=_calib(small_text), fallback="2", alpha=0.8)
    api.quantize_streamed(str(folder), tmp_path / "q", r, tokenizer=tok, device="cpu")
    qm = api.load_quantized(tmp_path / "q", device="cpu")
    assert qm.fp16_layers  # --fallback 2: two Linears stay float in both
    whole_q = api.perplexity(qm, tok, text, **kw)
    streamed_q = api.perplexity_streamed(str(tmp_path / "q"), tok, text, device="cpu", **kw)
    assert streamed_q["quantized"] and streamed_q["perplexity"] == whole_q["perplexity"]
    assert whole_q["perplexity"] != whole["perplexity"]  # the quantized model was measured, not the float one
