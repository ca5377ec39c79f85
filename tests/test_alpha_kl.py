"""`--alpha kl` (sq_export.quant.alpha.search_alpha_kl): one α per Linear-pair kind (up→down, v→o; the norm groups keep
the family's α), chosen by the KL of the every-Linear-INT8 model to the float model on calibration-split windows; with
and without an outlier prefix."""

import json

import pytest
import torch

from conftest import make_tiny, token_batches
from sq_export import api
from sq_export.errors import BadInput
from sq_export.quant import alpha as A, fallback, prefix as P
from sq_export.quant.calibrate import calibrate_ids
from sq_export.quant.recipe import CalibOptions, make_recipe

OPTS = CalibOptions(None, 4, 32)


def _model():
    """Tiny GQA Llama whose down_proj inputs carry outlier channels (a few up_proj rows ×50), like SmolLM2."""
    model, fam = make_tiny("llama")
    with torch.no_grad():
        for i in range(fam.num_layers()):
            model.get_submodule(f"model.layers.{i}.mlp.up_proj").weight[[5, 40, 99]] *= 50.0
    return model, fam


def _kl_of(model, fam, calib, qmodel):
    """KLScore of `qmodel` against the float `model` (after the calibration's prefix) on prepare's scoring windows."""
    s = fallback.KLScore(calib.scoring_windows(fallback.FALLBACK_WINDOWS), layers_path=fam.layers_path)
    with P.applied(model, calib.prefix):
        s.reference(model)
    return s(qmodel)


@pytest.mark.parametrize("prefix, rotate", [(None, None), (("ids", [1, 7, 9]), None), (("ids", [1, 7, 9]), 32)])
def test_alpha_kl_scores_the_model_prepare_builds(prefix, rotate):
    model, fam = _model()
    ids = token_batches(1, 1200, seed=6)[0]
    calib = calibrate_ids(model, fam, ids, OPTS, prefix=prefix)
    spec = None if prefix is None else "ids:1,7,9"
    qm = api.quantize(model, calib, make_recipe("default", calib=OPTS, fallback="none", alpha="kl", prefix_outliers=spec,
                                                rotate_down=rotate or "none"), copy=True)
    prep = qm.prepared
    assert prep.alpha == "kl" and P.installed(model) is None
    rec = prep.tune["alpha_kl"]
    groups = fam.groups(include_linear_pairs=True)
    assert set(prep.alpha_per_group) == {g.source for g in groups}
    by_kind = {}
    for src, a in prep.alpha_per_group.items():
        by_kind.setdefault(A.group_kind(src), set()).add(a)
        assert a in A.KL_ALPHA_GRID
    assert all(len(v) == 1 for v in by_kind.values())
    # the pair kinds are searched, every grid value tried once per kind; the norm kinds keep the family's α
    assert set(rec["kinds"]) == {"model.layers.*.self_attn.v_proj", "model.layers.*.mlp.up_proj"}
    assert by_kind["model.layers.*.input_layernorm"] == by_kind["model.layers.*.post_attention_layernorm"] == {fam.default_alpha}
    assert all(len(k["kl"]) == len(A.KL_ALPHA_GRID) for k in rec["kinds"].values())
    assert rec["final_kl"] <= rec["start_kl"]
    # with --rotate-down every trial is rotated as the delivered model is (rotated ranges included)
    assert rec.get("rotate_down") == rotate and (qm.model.get_submodule("model.layers.0.mlp.down_proj").rot is not None) == bool(rotate)
    # the search's trials are the model prepare delivers: its KL is the recorded one (prefix cache and scales included)
    assert _kl_of(model, fam, calib, qm.model) == pytest.approx(rec["final_kl"], rel=1e-4, abs=1e-7)
    # and replaying the decisions gives the same model without searching
    again = api.quantize(model, calib, prep.decisions(), copy=True)
    assert "alpha_kl" not in again.prepared.tune
    assert _kl_of(model, fam, calib, again.model) == pytest.approx(rec["final_kl"], rel=1e-4, abs=1e-7)


def test_alpha_kl_moves_a_kind_only_beyond_the_noise_margin():
    model, fam = _model()
    calib = calibrate_ids(model, fam, token_batches(1, 1200, seed=6)[0], OPTS)
    s = fallback.KLScore(calib.scoring_windows(2), layers_path=fam.layers_path)
    s.reference(model)
    stay, rec = A.search_alpha_kl(model, fam, calib.act_max, s, True, 0.85, min_gain=1.0)  # no drop can exceed 100 %
    assert set(stay.values()) == {0.85} and rec["final_kl"] == rec["start_kl"]
    free, rec = A.search_alpha_kl(model, fam, calib.act_max, s, True, 0.85, min_gain=0.0, norms=True)
    assert len(rec["kinds"]) == 4 and list(rec["kinds"])[2:] == ["model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm"]
    cur = rec["start_kl"]
    for kind, k in rec["kinds"].items():  # greedy: each kind takes the grid minimum given the kinds before it
        best = min(k["kl"], key=k["kl"].get)
        if k["kl"][best] < cur:
            assert k["alpha"] == float(best)
            cur = k["kl"][best]
    assert rec["final_kl"] == pytest.approx(cur) and rec["final_kl"] < rec["start_kl"]
    assert set(free.values()) != {0.85}  # on outlier channels this large, some kind leaves the start


def test_alpha_kl_options_and_refusals(tiny_dirs, small_text, tmp_path, capsys):
    from sq_export.cli import main
    from sq_export.quant.calibrate import Calibration

    r = make_recipe("default", alpha="kl")
    assert r.alpha == "kl" and "alpha kl" in r.describe() and not make_recipe("default", alpha="kl", fallback="none").needs_rows()
    model, fam = _model()
    calib = calibrate_ids(model, fam, token_batches(1, 600, seed=6)[0], OPTS)
    no_text = Calibration(calib.act_max, None, None, OPTS)
    with pytest.raises(BadInput, match="alpha kl"):
        api.quantize(model, no_text, make_recipe("default", calib=OPTS, fallback="none", alpha="kl"), copy=True)
    with pytest.raises(BadInput, match="smooth-pairs"):
        api.quantize(model, calib, make_recipe("default", calib=OPTS, fallback="none", alpha="kl", linear_pairs=False), copy=True)
    d = tiny_dirs("llama")
    cal = ["--calib-text", small_text / "calib.txt", "--samples", "4", "--calib-seq-len", "32"]
    code = main(["-q", "eval", str(d), "--alpha", "kl", "--fallback", "none", "--text", str(small_text / "eval.txt"), *map(str, cal),
                 "--seq-len", "64", "--max-tokens", "128", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["alpha"] == "kl" and len(res["alpha_per_group"]) == len(fam.groups(include_linear_pairs=True))
    assert main(["-q", "run", str(d), "-o", str(tmp_path / "never"), "--alpha", "kl"]) == 2
    assert "not a `run` option" in capsys.readouterr().err and not (tmp_path / "never").exists()
