"""Issue 5 (memory): working copies share what preparation only reads, a released model rebuilds identically
(replaying the α search and the fallback choice), SQNR computed as outputs appear equals SQNR from stored outputs,
and the malloc settings."""

import copy

import pytest
import torch

from conftest import FAMILIES, FixedCalibration, make_tiny, token_batches
from sq_export import memory
from sq_export.quant import reservoir
from sq_export.quant.calibrate import calibrate
from sq_export.quant.prepare import prepare, working_copy
from sq_export.quant.recipe import Recipe, make_recipe
from sq_export.measure.sqnr import linear_outputs, sqnr_against, sqnr_db
from sq_export.quant.smooth import logits_of


def _prepare(model, fam, x, **kw):
    res = reservoir.new_reservoir(fam, 256)
    act_max = calibrate(model, fam, token_batches(8, 32), reservoir=res)
    return prepare(model, fam, make_recipe("paper", **kw), FixedCalibration(act_max, res, check=x))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,pairs", [("naive", False), ("sq", False), ("sq", True)])
def test_working_copy_shares_read_only_tensors_and_leaves_the_model_alone(family, mode, pairs):
    model, fam = make_tiny(family)
    if pairs and not fam.linear_pairs:
        pytest.skip("no Linear pairs in this family")
    x = torch.as_tensor(token_batches(2, 32, seed=9))
    before = _state(model)
    shared = working_copy(model, fam, smoothing=mode == "sq", linear_pairs=pairs)
    emb = model.get_input_embeddings().weight
    assert shared.get_input_embeddings().weight is emb  # the largest tensor of a small model is never copied
    p1 = _prepare(shared, fam, x, mode=mode, linear_pairs=pairs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    p2 = _prepare(copy.deepcopy(model), fam, x, mode=mode, linear_pairs=pairs)
    assert torch.equal(logits_of(p1.model, x), logits_of(p2.model, x))
    storages = {t.untyped_storage().data_ptr() for t in model.parameters()}
    if mode == "naive":
        ids = {id(t) for t in model.parameters()}
        assert all(id(t) in ids for n, t in shared.named_parameters() if not n.endswith(("w_kn", "bias")))
        # the QLinears hold the float weights themselves (views), not copies: naive W8A8 costs no weight memory
        assert all(t.untyped_storage().data_ptr() in storages for t in shared.parameters())
    else:  # SQ: only what smoothing wrote is new memory, held once (the QLinear views the smoothed copy)
        from sq_export.quant.qlinear import QLinear

        new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in shared.parameters()
               if t.untyped_storage().data_ptr() not in storages}
        smoothed = {n for g in fam.groups(include_linear_pairs=pairs) for n in (g.source, *g.linears)}
        written = sum(t.untyped_storage().nbytes() for n in smoothed for t in model.get_submodule(n).parameters(recurse=False))
        assert sum(new.values()) == written
        assert all(isinstance(shared.get_submodule(n), QLinear) for n in p1.quantized)


def test_replayed_alpha_search_and_fallback_build_the_same_model():
    model, fam = make_tiny("llama")
    x = torch.as_tensor(token_batches(2, 32, seed=9))
    first = _prepare(working_copy(model, fam, smoothing=True, linear_pairs=True), fam, x, alpha="auto", linear_pairs=True,
                     fallback="2", clip="p99.9")
    assert first.alpha_per_group and len(first.fp16_layers) == 2
    again = _prepare(working_copy(model, fam, smoothing=True, linear_pairs=True), fam, x, alpha=dict(first.alpha_per_group),
                     linear_pairs=True, fallback=",".join(first.fp16_layers), clip="p99.9")
    assert again.alpha == first.alpha == "auto" and again.alpha_per_group == first.alpha_per_group
    assert again.fp16_layers == first.fp16_layers and again.quantized == first.quantized
    assert torch.equal(logits_of(first.model, x), logits_of(again.model, x))
    with pytest.raises(Exception):
        Recipe(alpha={"g": 1.5}).validate()


@pytest.mark.parametrize("family", FAMILIES)
def test_sqnr_as_outputs_appear_equals_sqnr_of_stored_outputs(family):
    model, fam = make_tiny(family)
    x = torch.as_tensor(token_batches(2, 32, seed=9))
    q = _prepare(copy.deepcopy(model), fam, x, mode="sq").model
    names = fam.quantized_linears()
    ref = linear_outputs(model, names, x)
    got = linear_outputs(q, names, x)
    want = {n: round(sqnr_db(ref[n], got[n]), 4) for n in names}
    assert sqnr_against(ref, q, names, x) == want
    assert all(v is None for v in sqnr_against(ref, model, names, x).values())  # the float model: exactly equal


def test_malloc_settings_and_rss():
    import sys

    if sys.platform.startswith("linux"):
        assert memory.configure_malloc() in (True, False)  # musl: no mallopt
        assert memory.rss_kb() > 0 and memory.rss_kb("VmHWM") >= memory.rss_kb()
    memory.release_memory()



def test_no_torch_model_is_alive_while_onnx_runtime_evaluates(tiny_dirs, small_text, tmp_path, monkeypatch):
    """The eval stage releases the float model before ONNX Runtime runs: nothing the run keeps (the recorded
    recipe decisions included) may still reference it."""
    import gc

    from transformers import PreTrainedModel

    from sq_export.measure import perplexity as evaluate
    from sq_export.cli import main

    alive = []
    orig = evaluate.onnx_perplexity

    def probe(path, *a, **k):
        gc.collect()
        alive.append(sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()))
        return orig(path, *a, **k)

    monkeypatch.setattr(evaluate, "onnx_perplexity", probe)
    argv = ["-q", "run", str(tiny_dirs("llama")), "-o", str(tmp_path / "out"), "--samples", "4", "--calib-seq-len", "32",
            "--max-tokens", "128", "--seq-len", "64", "--calib-text", str(small_text / "calib.txt"),
            "--text", str(small_text / "eval.txt"), "--until", "eval"]
    assert main(argv) == 0
    assert alive == [0, 0, 0, 0]  # fp, naive, paper, sq: no torch model alive while ONNX Runtime runs


def test_token_ids_tokenizes_a_file_once_per_version(tmp_path, monkeypatch):
    import os

    import numpy as np

    from conftest import tokenizer
    from sq_export import textdata

    tok = tokenizer()
    p = tmp_path / "t.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    calls = []
    orig = textdata.tokenize
    monkeypatch.setattr(textdata, "tokenize", lambda t, s: (calls.append(1), orig(t, s))[1])
    a = textdata.token_ids(tok, p, "calib")
    b = textdata.token_ids(tok, str(p), "calib")
    assert len(calls) == 1 and b is a and not a.flags.writeable
    assert np.array_equal(a, orig(tok, p.read_text()))
    p.write_text("another text, of another length")
    os.utime(p, ns=(1, 1))
    c = textdata.token_ids(tok, p, "calib")
    assert len(calls) == 2 and np.array_equal(c, orig(tok, p.read_text()))


def test_abs_max_equals_abs_then_amax_bit_for_bit():
    from sq_export.modeling import abs_max

    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 19, generator=g)
    w[:, 3] = -0.0  # a column of negative zeros: abs gives +0.0
    w[:, 4] = 0.0
    w[5, 6] = float("-inf")
    for dim in (0, 1):
        want = w.abs().amax(dim=dim)
        got = abs_max(w, dim)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), dim
    assert torch.equal(abs_max(w[:, :3]).view(torch.int32), w[:, :3].abs().amax().view(torch.int32))
    assert torch.equal(abs_max(w.t(), 0), w.t().abs().amax(dim=0))  # a transposed view (QLinear's w_kn)
