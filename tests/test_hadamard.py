"""`--rotate-down B` (sq_export.quant.hadamard): the MLP output Linear's input rotated by a block Hadamard before it is
quantized, the inverse folded into its weight. Exact in float; on a tiny Llama with outlier channels injected at
the down_proj input (float-exact: up_proj's rows × g, down_proj's columns ÷ g) it cuts the W8A8 logit error; the
exported graph computes what PyTorch's fake quantization computes; bad blocks and the paths that cannot take it are
refused in one line."""

import copy

import onnx
import pytest
import torch

import sq_export as sq
from conftest import FAMILIES, make_tiny
from sq_export.errors import BadInput
from sq_export.families import family_for
from sq_export.quant import hadamard

CAL = dict(samples=4, seq_len=32)
MLP_OUT = ("mlp.down_proj", "fc2", "mlp.dense_4h_to_h", "mlp.c_proj")


def test_hadamard_blocks_are_orthonormal_and_the_rotation_folds_exactly():
    for b in (2, 8, 64):
        h = hadamard.hadamard(b)
        assert torch.allclose(h @ h.t(), torch.eye(b), atol=1e-6) and torch.equal(h, h.t())
    for bad in (0, 1, 3, 48):
        with pytest.raises(BadInput, match="power of two"):
            hadamard.hadamard(bad)
    x, w = torch.randn(3, 5, 128, dtype=torch.float64), torch.randn(128, 40, dtype=torch.float64)
    h = hadamard.hadamard(32).double()
    r = torch.block_diag(*[h] * 4)
    assert torch.allclose(hadamard.block_rotate(x, h), x @ r)
    rw = (h.t() @ w.unflatten(0, (4, 32))).flatten(0, 1)  # what rotate_inputs stores
    assert torch.allclose(hadamard.block_rotate(x, h) @ rw, x @ w, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_names_its_mlp_output_linear(family):
    model, _ = make_tiny(family)
    fam = family_for(model)
    assert fam.mlp_out in MLP_OUT and fam.mlp_out in fam.linears
    names = hadamard.targets(fam)
    assert len(names) == fam.num_layers()
    mod = model.get_submodule(names[0])
    k = mod.in_features if hasattr(mod, "in_features") else mod.weight.shape[0]
    assert k == getattr(model.config, "intermediate_size", None) or k == 4 * model.config.hidden_size or k == getattr(model.config, "ffn_dim", None)


def _down_outliers(model, gain=40.0, channels=(3, 17, 90)):
    """Outlier channels at every down_proj input, float-exact: up_proj's output rows × gain, down_proj's input columns ÷ gain."""
    for layer in model.model.layers:
        for c in channels:
            layer.mlp.up_proj.weight.data[c] *= gain
            layer.mlp.down_proj.weight.data[:, c] /= gain
    return model


def _logit_sqnr(qm, ref, x):
    with torch.no_grad():
        y = qm.model(input_ids=x).logits
    return float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum()))


def test_rotate_down_cuts_the_error_of_down_proj_outliers_and_exports_what_pytorch_computes(tiny_dirs, small_text, tmp_path):
    from sq_export.api import text_ids
    from sq_export.measure.perplexity import onnx_perplexity
    from sq_export.onnxio.meta import read_metadata

    model, tok = sq.load_model(tiny_dirs("llama"))
    _down_outliers(model)
    calib = sq.calibrate(model, tok, small_text / "calib.txt", **CAL)
    x = calib.check_batch()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    sqnr = {}
    for b in (None, 32):  # norm smoothing only (no up→down pair): the rotation alone against the down_proj outliers
        qm = sq.quantize(model, calib, sq.Recipe(alpha=0.85, linear_pairs=False, rotate_down=b, fallback="none"), copy=True)
        sqnr[b] = _logit_sqnr(qm, ref, x)
    assert sqnr[32] > sqnr[None] + 3.0, sqnr  # measured: 3.2 dB → 8.7 dB
    with torch.no_grad():  # the float model is untouched (the rotated weights are new tensors)
        assert torch.equal(model(input_ids=x).logits, ref)

    qm = sq.quantize(model, calib, sq.Recipe(rotate_down=32, fallback="none"), copy=True)  # the default recipe + rotation
    assert qm.prepared.tune["rotate_down"] == {"block": 32, "linears": 2} and qm.prepared.graph_meta["rotate_down"] == "32"
    assert "rotated" in qm.recipe.describe() and "Hadamard blocks of 32" in qm.recipe.describe()
    ql = qm.model.get_submodule("model.layers.0.mlp.down_proj")
    assert ql.rot is not None and ql.rot.shape == (32, 32)
    g = sq.export_onnx(qm, tmp_path / "rot.onnx", weights="qdq")
    assert read_metadata(g.path)["rotate_down"] == "32"
    assert sq.check(g.path, target="trt").ok
    m = onnx.load(str(g.path))
    consts = {t.name: t for t in m.graph.initializer}
    rot_mm = [n for n in m.graph.node if n.op_type == "MatMul" and any(
        i in consts and list(consts[i].dims) == [32, 32] for i in n.input)]
    assert len(rot_mm) == 2  # one rotation per layer, before the down_proj's QuantizeLinear
    ids = text_ids(tok, small_text / "eval.txt", "eval")
    pt = sq.perplexity(qm, text=ids, seq_len=64, max_tokens=256)["perplexity"]
    ort = onnx_perplexity(str(g.path), ids, 64, 256)["perplexity"]
    assert ort == pytest.approx(pt, rel=2e-3)


def test_rotate_down_refusals(tiny_dirs, small_text):
    from sq_export.cli import build_parser
    from sq_export.commands._common import recipe_from

    for bad in (0, 48, True):
        with pytest.raises(BadInput, match="power of two"):
            sq.make_recipe("default", rotate_down=bad)
    with pytest.raises(BadInput, match="not --mode fp"):
        sq.make_recipe("fp", rotate_down=64)
    with pytest.raises(BadInput, match="leave out --clip"):
        sq.make_recipe("default", rotate_down=64, clip="p99.9")
    model, tok = sq.load_model(tiny_dirs("llama"))
    calib = sq.calibrate(model, tok, small_text / "calib.txt", **CAL)
    with pytest.raises(BadInput, match="not a multiple of 256"):  # the tiny MLP is 128 wide
        sq.quantize(copy.deepcopy(model), calib, sq.Recipe(rotate_down=256, fallback="none"))
    args = build_parser().parse_args(["export", "m", "-o", "x.onnx", "--rotate-down", "64"])
    assert recipe_from(args).rotate_down == 64
    assert build_parser().parse_args(["run", "m", "-o", "out", "--rotate-down", "64"]).rotate_down == 64  # run: test_pipeline
    from sq_export.stream.quantize import check_streamable

    check_streamable(sq.make_recipe("default", rotate_down=64, fallback="none"))  # streams (tests/test_stream.py)
