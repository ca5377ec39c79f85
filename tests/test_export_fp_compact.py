"""The compact float graph (`export --mode fp --weights qdq16`, passes/float_weights_fp16.py) and the float graph
from placeholders (`api.load_float(folder, lazy=True)`, `export --mode fp --stream`): float16 W -> Cast only where
float16 holds W exactly, so ONNX Runtime's logits are bit-identical to the float32 graph's; a float16 checkpoint's
graph about halves; the export from placeholders writes the loaded model's bytes (every family, plain and qdq16)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from conftest import FAMILIES, make_tiny_vocab, tiny_dir_factory, token_batches, tokenizer
from sq_export import api
from sq_export.errors import BadInput
from sq_export.measure.perplexity import ort_session
from sq_export.passes import float_weights_fp16 as fw


@pytest.fixture(scope="session")
def fp16_dirs(tmp_path_factory):
    """One tiny model folder per family saved in float16 (as Llama-2-7B's checkpoint is)."""
    return tiny_dir_factory(tmp_path_factory, "tiny16", half=True)


def _logits(path):
    ids = token_batches(2, 24, seed=11)
    return ort_session(str(path)).run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def _weights_by_type(path) -> dict:
    """{element type: bytes} of the 2-D initializers read by MatMul / Gemm / Gather, directly or through a Cast."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    cast_src = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    out, seen = {}, set()
    for n in m.graph.node:
        if n.op_type not in fw.WEIGHT_INPUTS:
            continue
        for i in fw.WEIGHT_INPUTS[n.op_type]:
            if i >= len(n.input):
                continue
            src = cast_src.get(n.input[i], n.input[i])
            t = inits.get(src)
            if t is not None and len(t.dims) == 2 and src not in seen:
                seen.add(src)
                a = numpy_helper.to_array(t)
                out[a.dtype.name] = out.get(a.dtype.name, 0) + a.nbytes
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_float_graph_of_a_float16_checkpoint(family, fp16_dirs, tmp_path):
    """Every weight of a float16 checkpoint is exact in float16: all stored float16 (half the weight bytes, the
    file about halves), the same ONNX Runtime logits bit for bit, and `check` accepts it."""
    qm = api.load_float(fp16_dirs(family), device="cpu")
    a, b = tmp_path / "fp.onnx", tmp_path / "fp16w.onnx"
    ra = api.export_onnx(qm, a, weights="qdq")
    rb = api.export_onnx(qm, b, weights="qdq16")
    wa, wb = _weights_by_type(a), _weights_by_type(b)
    assert set(wa) == {"float32"} and set(wb) == {"float16"} and wb["float16"] * 2 == wa["float32"]
    assert rb.metadata["weights_fp16"] > 0 and rb.metadata["weights_kept_float32"] == 0
    assert rb.bytes < 0.62 * ra.bytes  # tiny models: the graph itself is a good part of the file
    assert np.array_equal(_logits(a), _logits(b))
    api.check(b).raise_for_violations()  # the graph passes see float16 -> Cast weights as constants


@pytest.mark.parametrize("family", ["llama", "opt", "qwen3"])
def test_weights_float16_cannot_hold_stay_float32(family, tmp_path):
    """A float32 model: its random weights are not float16 values and stay float32 (counted); one weight rounded to
    float16 values beforehand is the one stored float16. Same logits bit for bit either way."""
    import torch

    model, _ = make_tiny_vocab(family)
    emb = model.get_input_embeddings().weight
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not emb][0]
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())
    a, b = tmp_path / "fp.onnx", tmp_path / "fp16w.onnx"
    api.export_onnx(model, a, weights="qdq")
    rb = api.export_onnx(model, b, weights="qdq16")
    assert rb.metadata["weights_fp16"] == 1 and rb.metadata["weights_kept_float32"] > 0
    wb = _weights_by_type(b)
    assert wb["float16"] * 2 == lin.weight.numel() * 4 and wb["float32"] == _weights_by_type(a)["float32"] - 2 * wb["float16"]
    assert np.array_equal(_logits(a), _logits(b))


def test_fp16_exact():
    x = np.array([[1.0, -0.0, 2.0**-24, 65504.0, np.inf]], np.float32)
    assert fw.fp16_exact(x) and fw.fp16_exact(np.zeros((0, 3), np.float32))
    for bad in (1e-8, 70000.0, np.nan, 1.0 + 2.0**-12, 2.0**-25 * 3):
        assert not fw.fp16_exact(np.array([[1.0, bad]], np.float32)), bad
    big = np.ones((300, 64), np.float32)
    big[-1, -1] = 0.1  # the last row block catches it too
    old = fw.CHECK_BLOCK
    try:
        fw.CHECK_BLOCK = 64 * 7
        assert not fw.fp16_exact(big) and not fw.fp16_exact(big.T) and fw.fp16_exact(big[:-1])
    finally:
        fw.CHECK_BLOCK = old


def _matmul_graph(w_tensor):
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 64]))
    wv = ir.val("w", const_value=w_tensor)
    wv.type, wv.shape = ir.TensorType(w_tensor.dtype), w_tensor.shape
    mm = ir.node("MatMul", [x, wv], name="mm")
    mm.outputs[0].name = "y"
    return ir.Model(ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[wv], opset_imports={"": 17}), ir_version=8)


def test_a_weight_stored_in_float16_is_never_read_to_check_it():
    """A lazy weight whose source stores float16 (SOURCE_DTYPE: a float16 checkpoint's tensor) is converted
    without being read; its float16 values are computed when written. Any other lazy weight is read to check."""
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float16).astype(np.float32)
    reads = []

    def thunk():
        reads.append(1)
        return ir.Tensor(w)

    for known, want_reads in ((True, 0), (False, 1)):
        reads.clear()
        lt = ir.LazyTensor(thunk, dtype=ir.DataType.FLOAT, shape=ir.Shape([64, 32]), name="w")
        if known:
            lt.meta[fw.SOURCE_DTYPE] = ir.DataType.FLOAT16
        m = _matmul_graph(lt)
        p = fw.FloatWeightsToFp16Pass()
        p(m)
        assert (p.count, p.kept_float32, len(reads)) == (1, 0, want_reads)
        (t,) = [v.const_value for v in m.graph.initializers.values()]
        assert isinstance(t, ir.LazyTensor) and t.dtype == ir.DataType.FLOAT16
        assert np.array_equal(t.numpy(), w.astype(np.float16)) and len(reads) == want_reads + 1
        assert [n.op_type for n in m.graph] == ["Cast", "MatMul"]


# ----- the float graph from placeholders -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stored", ["float32", "float16"])
def test_lazy_float_export_is_byte_identical(family, stored, tiny_dirs, fp16_dirs, tmp_path, monkeypatch):
    """api.load_float(folder, lazy=True) writes the loaded model's bytes, plain and qdq16, for a float32 and a
    float16 checkpoint; a float16 checkpoint's weights are never read to check them (known from its header)."""
    folder = tiny_dirs(family) if stored == "float32" else fp16_dirs(family)
    loaded, lazy = api.load_float(folder, device="cpu"), api.load_float(folder, lazy=True)
    assert lazy.model._sq_lazy_weights is not None and lazy.recipe.mode == "fp"
    for w in ("qdq", "qdq16"):
        a, b = tmp_path / f"loaded_{w}.onnx", tmp_path / f"lazy_{w}.onnx"
        api.export_onnx(loaded, a, weights=w)
        if stored == "float16":  # the lazy export must not read any weight to check it
            def never(a):
                raise AssertionError("a float16 checkpoint's weight was read to check it")
            monkeypatch.setattr(fw, "fp16_exact", never)
        api.export_onnx(lazy, b, weights=w)
        monkeypatch.undo()
        assert a.read_bytes() == b.read_bytes(), w


def test_lazy_float_model_refusals(tiny_dirs, small_text, tmp_path):
    folder = tiny_dirs("llama")
    ql = api.load_float(folder, lazy=True)
    for kw in (dict(trace_device="cuda"), dict(dtype="fp16")):  # (the decode graph from placeholders is exact:
        with pytest.raises(BadInput, match="lazy=True"):        # tests/test_stream.py)
            api.export_onnx(ql, tmp_path / "x.onnx", **kw)
    with pytest.raises(BadInput, match="placeholders"):
        api.perplexity(ql, tokenizer(), small_text / "eval.txt", seq_len=32, max_tokens=64)
    with pytest.raises(BadInput, match="device and dtype"):
        api.load_float(folder, lazy=True, device="cuda")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(BadInput, match="gguf"):
        api.load_float(gguf, lazy=True)
    assert not (tmp_path / "x.onnx").exists()


def test_cli_fp_stream(fp16_dirs, tmp_path, capsys):
    """`export FOLDER --mode fp --weights qdq16 --stream` writes the bytes of the loaded model's export; `--stream`
    without DIR for a quantized recipe, or with one for --mode fp, is one line and exit 2."""
    from sq_export.cli import main

    folder = str(fp16_dirs("llama"))
    base = ["-q", "export", folder, "--mode", "fp", "--weights", "qdq16", "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "w.onnx")]) == 0
    assert main([*base, "--stream", "-o", str(tmp_path / "s.onnx")]) == 0
    assert (tmp_path / "w.onnx").read_bytes() == (tmp_path / "s.onnx").read_bytes()
    assert set(_weights_by_type(tmp_path / "s.onnx")) == {"float16"}
    capsys.readouterr()
    for args in (["-q", "export", folder, "--recipe", "paper", "--stream", "-o", str(tmp_path / "q.onnx")],
                 [*base, "--stream", str(tmp_path / "d"), "-o", str(tmp_path / "q.onnx")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--stream" in err and "DIR" in err, err
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "d").exists()
