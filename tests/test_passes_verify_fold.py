import numpy as np
import onnx
import pytest

import sq_export.passes as P
from _sqgraphs import feeds, load, make_graphs_module, ops, run

ALL = sorted(make_graphs_module().FIXTURES)


def test_fixtures_are_up_to_date():
    mg = make_graphs_module()
    for name, kw in mg.FIXTURES.items():
        assert load(name).SerializeToString() == mg.build(**kw).SerializeToString(), f"rerun tests/fixtures/make_graphs.py ({name})"


@pytest.mark.parametrize("name", ["clean_rms", "clean_ln", "clean_rms_int8w", "clean_ln_int8w", "float_rms",
                                  "decomposed_ln", "one_sided_dq", "clean_rms_gemma"])
def test_clean_smoothing(name):
    assert P.verify_folded(load(name)) == []


def test_norms_found():
    kinds = lambda name: sorted(n.kind for n in P.find_norms(P.to_ir(load(name)).graph))  # noqa: E731
    assert kinds("clean_rms") == ["rmsnorm"] * 3
    assert kinds("clean_ln") == ["layernorm"] * 3
    assert kinds("decomposed_ln") == ["layernorm", "layernorm", "layernorm_decomposed"]
    # Gemma's x·rsqrt(mean(x²)+eps)·(1+w) with the gain left as Add(1, Cast(w)): an RMSNorm whose gain is 1+w
    assert kinds("clean_rms_gemma") == ["rmsnorm"] * 3
    g = P.to_ir(load("clean_rms_gemma")).graph
    from sq_export.passes._graph import gain_array

    for n in P.find_norms(g):
        assert n.gamma.producer().op_type == "Add"
        w = next(i for i in load("clean_rms_gemma").graph.initializer if i.name == n.name.replace("/Mul_1", ".weight_minus_one"))
        np.testing.assert_array_equal(gain_array(n.gamma), 1.0 + onnx.numpy_helper.to_array(w))


@pytest.mark.parametrize("name,rule,node", [
    ("unfolded_mul_rms", "SQ001", "/m/model/layers.0/input_layernorm/smooth/Mul"),
    ("unfolded_mul_ln", "SQ001", "/m/model/layers.0/input_layernorm/smooth/Mul"),
    ("unfolded_div_rms", "SQ001", "/m/model/layers.0/post_attention_layernorm/smooth/Div"),
    ("mul_before_down", "SQ002", "/m/model/layers.0/mlp/down_proj/smooth/Mul"),
    ("unfolded_mul_rms_gemma", "SQ001", "/m/model/layers.0/input_layernorm/smooth/Mul"),
])
def test_unfolded_found(name, rule, node):
    v = P.verify_folded(load(name))
    assert [(x.rule, x.node) for x in v] == [(rule, node)]
    if rule == "SQ001":
        assert "layernorm" in v[0].message  # names the norm


def test_scalar_mul_is_not_smoothing():
    # attention's 1/sqrt(d) Mul sits in every fixture; the per-channel test must ignore scalars
    m = load("clean_rms")
    assert any(n.op_type == "Mul" and n.name.endswith("self_attn/Mul") for n in m.graph.node)
    assert P.verify_folded(m) == []


@pytest.mark.parametrize("name,n_folds,dup", [
    ("unfolded_mul_rms", 1, 0), ("unfolded_mul_ln", 1, 0), ("unfolded_div_rms", 1, 0),
    ("unfolded_shared_norm_ln", 2, 1), ("unfolded_shared_norm_rms", 2, 1),
    ("unfolded_mul_rms_gemma", 1, 0), ("unfolded_shared_norm_rms_gemma", 2, 1),
])
def test_fold_round_trip(name, n_folds, dup):
    m = load(name)
    before = ops(m)
    fixed, folds = P.fold_smoothing(m)
    onnx.checker.check_model(fixed, full_check=True)
    assert len(folds) == n_folds and sum(f.duplicated for f in folds) == dup
    assert P.verify_folded(fixed) == [] and P.lint_qdq(fixed) == []
    after = ops(fixed)
    smooth_op = "Div" if "div" in name else "Mul"
    norm_op = "LayerNormalization" if name.endswith("ln") else "Mul"
    # the smoothing Mul/Div are gone; a duplicated norm adds one norm op back
    assert before[smooth_op] - after[smooth_op] == n_folds - (dup if smooth_op == norm_op else 0)
    if norm_op == "LayerNormalization":
        assert after["LayerNormalization"] == before["LayerNormalization"] + dup
    assert not any(n.name.endswith("/smooth/Mul") or n.name.endswith("/smooth/Div") for n in fixed.graph.node)
    assert ops(m) == before  # input untouched
    for seed in range(3):
        f = feeds(seed)
        np.testing.assert_allclose(run(fixed, f), run(m, f), rtol=1e-5, atol=1e-5)


def test_fold_leaves_linear_smoothing_alone():
    m = load("mul_before_down")
    fixed, folds = P.fold_smoothing(m)
    assert folds == []
    assert [v.rule for v in P.verify_folded(fixed)] == ["SQ002"]


def test_fold_is_a_real_change_numerically():
    # dropping the Mul instead of folding it must be caught by the numeric comparison
    m = load("unfolded_mul_ln")
    broken = onnx.ModelProto.FromString(m.SerializeToString())
    mul = next(n for n in broken.graph.node if n.name.endswith("/smooth/Mul"))
    for n in broken.graph.node:
        for i, x in enumerate(n.input):
            if x == mul.output[0]:
                n.input[i] = mul.input[0]
    broken.graph.node.remove(mul)
    assert P.verify_folded(broken) == []
    assert not np.allclose(run(broken, feeds()), run(m, feeds()), rtol=1e-5, atol=1e-5)


def test_gemma_norm_stray_mul_caught_without_the_norm_match():
    """A stray per-channel Mul after Gemma's norm is SQ001 (the norm is recognised through its Add(1, w) gain); were
    the norm not recognised, SQ002 would still catch the Mul in front of the QuantizeLinear."""
    from sq_export.passes.verify_folded import find_unfolded

    m = load("unfolded_mul_rms_gemma")
    v = P.verify_folded(m)
    assert [x.rule for x in v] == ["SQ001"] and "input_layernorm" in v[0].message
    g = P.to_ir(m).graph
    assert [x.rule for x in find_unfolded(g, norms=[])] == ["SQ002"]
    # the fold drops the Add(1, w) chain of a norm it replaces: no dangling Add/Cast left
    fixed, folds = P.fold_smoothing(m)
    assert len(folds) == 1 and not folds[0].duplicated
    names = {n.name for n in fixed.graph.node}
    assert "/m/model/layers.0/input_layernorm/Add_1" not in names and "/m/model/layers.0/input_layernorm/Cast" not in names
    assert not any(i.name == "/m/model/layers.0/input_layernorm.weight_minus_one" for i in fixed.graph.initializer)
