"""Issue 17: the outlier prefix in the exported logits graph: constants concatenated into every layer's keys and
values, positions offset, mask widened; ONNX Runtime = PyTorch fake quantization with the prefix; the prefix
positions are not scored; the graph check (passes/prefix_kv.py) lints shape and positions."""

import numpy as np
import onnx
import pytest
import torch

from conftest import make_tiny, token_batches
from sq_export import api
from sq_export.quant.calibrate import calibrate_ids
from sq_export.quant.recipe import CalibOptions, make_recipe

PREFIX = "ids:1,7,9"
OPTS = CalibOptions(None, 4, 32)


@pytest.fixture(scope="module")
def prefixed():
    model, fam = make_tiny("llama")
    ids = token_batches(1, 800, seed=6)[0]
    cal = calibrate_ids(model, fam, ids, OPTS, rows=64, prefix=("ids", [1, 7, 9]))
    qm = api.quantize(model, cal, make_recipe("default", calib=OPTS, fallback="none", prefix_outliers=PREFIX), copy=True)
    return model, fam, ids, qm


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("weights", ["qdq", "int8"])
def test_ort_logits_equal_pytorch_fake_quant_with_the_prefix(prefixed, tmp_path, weights):
    _, _, _, qm = prefixed
    path = tmp_path / "p.onnx"
    api.export_onnx(qm, path, weights=weights, target="tensorrt")
    s = _ort(path)
    for b, L in [(2, 16), (1, 7), (3, 40)]:  # other batch sizes and lengths than the export's example
        x = token_batches(b, L, seed=9)
        with torch.no_grad():
            ref = qm.model(input_ids=torch.as_tensor(x), use_cache=False).logits.numpy()
        got = s.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0]
        assert got.shape == (b, L, ref.shape[-1])  # the prefix positions are not part of the logits
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    rep = api.check(path)
    assert rep.violations == [], [str(v) for v in rep.violations]
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["sq_export.prefix_outliers"] == "1,7,9" and meta["sq_export.prefix_length"] == "3"


def test_ort_perplexity_scores_the_same_tokens_as_pytorch(prefixed, tmp_path):
    from sq_export.measure.perplexity import onnx_perplexity, torch_perplexity

    _, _, ids, qm = prefixed
    path = tmp_path / "p.onnx"
    api.export_onnx(qm, path, weights="int8", target="tensorrt")
    text = ids[:200]
    a = onnx_perplexity(str(path), text, seq_len=64)
    b = torch_perplexity(qm.model, text, seq_len=64, desc=None)
    assert a["tokens"] == b["tokens"] == 200 - 4  # chunks of 64, 64, 64, 8: each predicts its tokens 1..n-1
    assert abs(a["perplexity"] - b["perplexity"]) < 1e-4 * b["perplexity"]


def test_ort_target_runs_the_prefixed_graph(prefixed, tmp_path):
    _, _, _, qm = prefixed
    path = tmp_path / "p.onnx"
    api.export_onnx(qm, path, weights="int8", target="ort")
    x = token_batches(2, 16, seed=9)
    with torch.no_grad():
        ref = qm.model(input_ids=torch.as_tensor(x), use_cache=False).logits.numpy()
    got = _ort(path).run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0]
    # ONNX Runtime's integer kernels can flip an INT8 rounding tie now and then (plain graphs too): close, not equal
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert api.check(path, target="ort").violations == []


def _with_meta(src, dst, **kv):
    m = onnx.load(str(src))
    props = {p.key: p.value for p in m.metadata_props}
    props.update({f"sq_export.{k}": str(v) for k, v in kv.items()})
    del m.metadata_props[:]
    for k in sorted(props):
        m.metadata_props.add(key=k, value=props[k])
    onnx.save(m, str(dst))
    return dst


def test_check_catches_a_prefix_length_that_does_not_match(prefixed, tmp_path):
    _, _, _, qm = prefixed
    path = tmp_path / "p.onnx"
    api.export_onnx(qm, path, weights="qdq", target="tensorrt")
    bad = _with_meta(path, tmp_path / "bad.onnx", prefix_length=4, prefix_outliers="1,7,9,9")
    rules = {v.rule for v in api.check(bad).violations}
    assert {"PFX001", "PFX002", "PFX003"} <= rules


def test_check_catches_a_graph_without_the_prefix(prefixed, tmp_path):
    model, fam, ids, _ = prefixed
    qm = api.quantize(model, calibrate_ids(model, fam, ids, OPTS, rows=64), make_recipe("default", calib=OPTS, fallback="none"), copy=True)
    path = tmp_path / "plain.onnx"
    api.export_onnx(qm, path, weights="qdq", target="tensorrt")
    assert api.check(path).violations == []  # no prefix claimed: nothing to lint
    bad = _with_meta(path, tmp_path / "bad.onnx", prefix_length=3, prefix_outliers="1,7,9")
    assert {v.rule for v in api.check(bad).violations} == {"PFX001", "PFX002", "PFX003"}


def test_decode_graph_starts_from_the_prefix_as_its_initial_past(prefixed, tmp_path):
    from sq_export.export.decode import read_prefix
    from sq_export.measure.generate import greedy_onnx, greedy_torch
    from sq_export.measure.perplexity import ort_session

    _, _, _, qm = prefixed
    path = tmp_path / "d.onnx"
    api.export_onnx(qm, path, weights="int8", target="tensorrt", decode=True)
    pre = read_prefix(path)
    assert len(pre) == 4 and pre["past_key_values.0.key"].shape == (1, 2, 3, 16)
    np.testing.assert_array_equal(pre["past_key_values.1.value"], qm.prepared.prefix.values[1].numpy())
    assert api.check(path).violations == []
    from sq_export.engine.trt_compat import graph_facts

    assert graph_facts(path).prefix_length == 3  # in the engine sidecar: `generate ENGINE` knows to start from it
    prompts = token_batches(2, 6, seed=11)
    want = greedy_torch(qm.model, prompts, 8)  # PyTorch: the installed prefix fills the empty cache
    sess = ort_session(str(path))
    np.testing.assert_array_equal(greedy_onnx(sess, prompts, 8, prefix=pre), want)
    np.testing.assert_array_equal(greedy_onnx(sess, prompts, 8, prefix=pre, pad_slots=1), want)
    # the prefill logits of the decode graph are the logits graph's
    from sq_export.kvcache import PAST_PREFIX

    x = token_batches(1, 9, seed=12)
    feed = {"input_ids": x, "attention_mask": np.ones((1, 12), np.int64), "position_ids": np.arange(3, 12)[None], **pre}
    got = sess.run(["logits"], {k: v for k, v in feed.items() if k == "input_ids" or k in ("attention_mask", "position_ids") or k.startswith(PAST_PREFIX)})[0]
    with torch.no_grad():
        ref = qm.model(input_ids=torch.as_tensor(x), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    # a decode graph that claims a prefix it does not carry is caught
    plain = tmp_path / "plain.onnx"
    m = onnx.load(str(path))
    keep = [t for t in m.graph.initializer if not t.name.startswith("prefix_outliers.")]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    onnx.save(m, str(plain))
    assert {v.rule for v in api.check(plain).violations} == {"PFX004"}
