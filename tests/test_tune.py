"""Issue 7: Linear-pair smoothing, --alpha auto, --clip, --fallback, `diagnose`."""

import copy
import json
import math

import pytest
import torch

from conftest import FAMILIES, make_tiny, token_batches
from sq_export.quant.calibrate import calibrate, collect_act_max
from sq_export.quant.qlinear import QLinear, quantize_model, static_scales
from sq_export.quant.smooth import apply_smoothing, logits_of, smoothed_act_max
from sq_export.quant import alpha as alpha_search, clip as clipping, fallback, reservoir
from sq_export.quant import recipe as recipe_mod
PAIR_FAMILIES = [f for f in FAMILIES if make_tiny(f, outliers=False)[1].linear_pairs]


def _llama_down_outliers(gain=50.0):
    """Tiny GQA Llama whose down_proj inputs carry outlier channels (a few up_proj rows ×gain), like SmolLM2."""
    model, fam = make_tiny("llama")
    with torch.no_grad():
        for i in range(fam.num_layers()):
            model.get_submodule(f"model.layers.{i}.mlp.up_proj").weight[[5, 40, 99]] *= gain
    return model, fam


def _quantized_copy(model, fam):
    """(a static W8A8 copy of `model`, {name: its float Linear}) with scales from 4 × 32 calibration tokens."""
    names = fam.quantized_linears()
    m = copy.deepcopy(model)
    fl = {n: m.get_submodule(n) for n in names}
    quantize_model(m, names, "static", static_scales(calibrate(model, fam, token_batches(4, 32)), names))
    return m, fl


def _static_error(model, fam, act_max, x, ref, **smooth):
    m = copy.deepcopy(model)
    a = act_max
    if smooth:
        f = apply_smoothing(m, fam, act_max, smooth.get("alpha", 0.85), linear_pairs=smooth.get("pairs", False))
        a = smoothed_act_max(act_max, fam, f, smooth.get("pairs", False))
    names = fam.quantized_linears()
    quantize_model(m, names, "static", static_scales(a, names))
    return float((logits_of(m, x) - ref).pow(2).mean().sqrt())


def test_pair_families_include_gqa():
    assert {"llama", "glm", "opt"} <= set(PAIR_FAMILIES)
    for f in ("llama", "glm"):
        m, fam = make_tiny(f)
        assert m.config.num_key_value_heads < m.config.num_attention_heads
        assert any(g.kv_repeat > 1 for g in fam.groups(include_linear_pairs=True))


@pytest.mark.parametrize("family", PAIR_FAMILIES)
@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_pair_smoothing_is_exact(family, alpha):
    model, fam = make_tiny(family)
    with torch.no_grad():  # make the consumer inputs uneven so the pair factors are far from 1
        for g in fam.groups(include_linear_pairs=True):
            if g.kind == "linear":
                w = model.get_submodule(g.source).weight
                w.mul_(torch.linspace(0.2, 8.0, w.shape[0]).view(-1, 1))
    act_max = calibrate(model, fam, token_batches(4, 32))
    x = torch.as_tensor(token_batches(2, 48, seed=3))
    ref = logits_of(model, x)
    m = copy.deepcopy(model)
    factors = apply_smoothing(m, fam, act_max, alpha, linear_pairs=True)
    pair_srcs = [g.source for g in fam.groups(include_linear_pairs=True) if g.kind == "linear"]
    assert pair_srcs and all(float((factors[s] - 1).abs().max()) > 0.1 for s in pair_srcs)
    assert float((logits_of(m, x) - ref).abs().max()) <= 2e-4 * max(1.0, float(ref.abs().max()))
    # and the smoothed ranges equal a second calibration pass of the smoothed model
    again = calibrate(m, fam, token_batches(4, 32))
    pred = smoothed_act_max(act_max, fam, factors, True)
    for n in fam.quantized_linears():
        torch.testing.assert_close(again[n], pred[n], rtol=1e-4, atol=1e-6)


def test_pairs_reduce_static_error_on_down_proj_outliers():
    model, fam = _llama_down_outliers()
    act_max = calibrate(model, fam, token_batches(8, 32))
    x = torch.as_tensor(token_batches(4, 48, seed=5))
    ref = logits_of(model, x)
    plain = _static_error(model, fam, act_max, x, ref, alpha=0.85)
    pairs = _static_error(model, fam, act_max, x, ref, alpha=0.85, pairs=True)
    assert pairs < 0.6 * plain, (plain, pairs)


def test_reservoir_is_bounded_deterministic_and_leaves_act_max_alone():
    model, fam = make_tiny("llama")
    b = token_batches(8, 32)
    plain = collect_act_max(model, fam.quantized_linears(), b)
    r1, r2 = reservoir.new_reservoir(fam, rows=50), reservoir.new_reservoir(fam, rows=50)
    with_res = collect_act_max(model, fam.quantized_linears(), b, reservoir=r1)
    collect_act_max(model, fam.quantized_linears(), b, reservoir=r2)
    for n in plain:
        assert torch.equal(plain[n], with_res[n])
    keys = set(reservoir.input_keys(fam).values())
    assert set(r1.data) == keys and len(keys) == 4 * fam.num_layers()  # q/k/v and gate/up share one sample
    for k in keys:
        assert r1[k].shape[0] == 50 and r1.seen[k] == 8 * 32
        assert torch.equal(r1[k], r2[k])
        # every kept row is a real input row: bounded by the per-channel max
        assert (r1[k].abs() <= plain[k] + 1e-6).all()


def test_clip_percentile_and_mse():
    rows = torch.arange(1, 1001, dtype=torch.float32).view(10, 100)
    assert clipping.clip_amax(rows, 1000.0, None) == 1000.0
    assert clipping.clip_amax(rows, 1000.0, ("pct", 50.0)) == 500.0
    assert clipping.clip_amax(rows, 1000.0, recipe_mod.parse_clip("p100")) == 1000.0
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 4096, generator=g) * 2 - 1  # many small values and one moderate outlier:
    x[0, 0] = 4.0  # clipping it costs 3² once, the max range costs (4/127)²/12 on each of 262k values
    mx = 4.0
    am = clipping.clip_amax(x, mx, recipe_mod.parse_clip("mse"))
    err = lambda a: float((clipping.fake_quant_tensor(x, a) - x).pow(2).sum())  # noqa: E731
    assert am < 0.5 * mx and err(am) < 0.6 * err(mx)
    assert err(am) <= min(err(mx * r) for r in clipping.MSE_CLIP_RATIOS) + 1e-6
    # a lone huge value costs more clipped than the coarser grid costs the rest: mse keeps (nearly) the max
    y = torch.randn(64, 256, generator=g)
    y[0, 0] = 400.0
    assert clipping.clip_amax(y, 400.0, recipe_mod.parse_clip("mse")) > 300
    for bad in ("p20", "q99", "median"):
        with pytest.raises(Exception):
            recipe_mod.parse_clip(bad)


def _prepare(model, fam, **kw):
    from conftest import FixedCalibration
    from sq_export.quant.prepare import prepare
    from sq_export.quant.recipe import make_recipe

    score = kw.pop("_score", None)
    res = reservoir.new_reservoir(fam, 256)
    act_max = calibrate(model, fam, token_batches(8, 32), reservoir=res)
    x = torch.as_tensor(token_batches(2, 32, seed=9))
    return prepare(model, fam, make_recipe("paper", **kw), FixedCalibration(act_max, res, check=x), fallback_score=score)


def test_alpha_auto_searches_without_model_forwards_and_reports_per_group():
    model, fam = _llama_down_outliers()
    res = reservoir.new_reservoir(fam, 256)
    act_max = calibrate(model, fam, token_batches(8, 32), reservoir=res)

    def boom(*a, **k):
        raise AssertionError("search_alpha ran the model")

    fwd = model.forward
    model.forward = boom
    try:
        alphas = alpha_search.search_alpha(model, fam, act_max, res, linear_pairs=True)
    finally:
        model.forward = fwd
    groups = fam.groups(include_linear_pairs=True)
    assert set(alphas) == {g.source for g in groups}
    assert all(a in alpha_search.ALPHA_GRID for a in alphas.values())
    # the chosen α is the grid minimum of the group's error, and no worse than the family default
    hd = model.config.head_dim
    for g in (groups[0], groups[3]):  # a norm group and a GQA v→o pair
        rows = reservoir.rows_for(res, fam, g.linears[0])
        e = lambda a: alpha_search.group_error(model, g, act_max, rows, a, hd if g.kind == "linear" else None)  # noqa: E731
        assert e(alphas[g.source]) <= min(e(a) for a in alpha_search.ALPHA_GRID) + 1e-9
    # (prepare → Prepared.alpha "auto" + alpha_per_group: test_cli_eval_export_check_with_tuning)


def test_alpha_grid_reaches_one_and_factors_stay_defined():
    from sq_export.quant.smooth import smoothing_factors

    assert list(alpha_search.ALPHA_GRID) == sorted(set(alpha_search.ALPHA_GRID)) and alpha_search.ALPHA_GRID[-1] == 0.95  # 1.0 measured worse
    act = torch.tensor([0.0, 1e-9, 0.5, 300.0])
    w = [torch.tensor([[0.0, 2.0, 1e-7, 0.1]])]  # a zero weight column and a zero activation channel
    s = smoothing_factors(act, w, 1.0)  # α=1: weights^0 = 1, s = max|x| (clamped), no NaN/inf from the zero column
    assert torch.isfinite(s).all() and (s > 0).all()
    torch.testing.assert_close(s, act.clamp(min=1e-5))
    # and α=1 is a legal, exact smoothing of a model with pairs
    model, fam = _llama_down_outliers()
    act_max = calibrate(model, fam, token_batches(4, 32))
    x = torch.as_tensor(token_batches(2, 32, seed=3))
    ref = logits_of(model, x)
    m = copy.deepcopy(model)
    apply_smoothing(m, fam, act_max, 1.0, linear_pairs=True)
    assert float((logits_of(m, x) - ref).abs().max()) <= 2e-4 * max(1.0, float(ref.abs().max()))


def test_fallback_names_count_and_auto():
    model, fam = _llama_down_outliers()
    names = fam.quantized_linears()
    p = _prepare(copy.deepcopy(model), fam, fallback=f"{names[6]},{names[0]}")
    assert p.fp16_layers == [names[6], names[0]] and len(p.quantized) == len(names) - 2
    p = _prepare(copy.deepcopy(model), fam, linear_pairs=True, fallback="3")
    assert len(p.fp16_layers) == 3
    for n in names:
        assert isinstance(p.model.get_submodule(n), QLinear) == (n not in p.fp16_layers)
    # auto: greedy against a score, stops at the target or at the budget
    x = torch.as_tensor(token_batches(2, 32, seed=11))
    ref = logits_of(model, x)
    score = lambda m: 1.0 + float((logits_of(m, x) - ref).pow(2).mean())  # noqa: E731
    p = _prepare(copy.deepcopy(model), fam, fallback="auto", max_fallback="2", target_ppl_increase=0.0, _score=score)
    fb = p.tune["fallback"]
    assert 1 <= len(p.fp16_layers) <= 2 and fb["final_score"] < fb["quant_score"]
    assert [h["linear"] for h in fb["history"]] == p.fp16_layers
    p = _prepare(copy.deepcopy(model), fam, fallback="auto", target_ppl_increase=1e6, _score=score)
    assert p.fp16_layers == [] and p.tune["fallback"]["met"]


def test_fallback_auto_orders_by_measured_gain_not_sqnr():
    """The greedy tries candidates in order of their measured gain alone; SQNR only pre-filters (candidates=)."""
    names = [f"l{i}" for i in range(6)]
    model = torch.nn.Module()
    for n in names:
        model.add_module(n, torch.nn.Identity())
    float_linears = {n: torch.nn.Linear(1, 1) for n in names}  # "float" modules are Linear, "quantized" Identity
    cost = {"l0": 1.0, "l1": 0.1, "l2": 5.0, "l3": 0.2, "l4": 3.0, "l5": 0.0}
    calls = []

    def score(m):
        calls.append(1)
        return 1.0 + sum(c for n, c in cost.items() if isinstance(m.get_submodule(n), torch.nn.Identity))

    sens = {n: float(i) for i, n in enumerate(names)}  # SQNR order l0 < l1 < ... (l0 "worst")
    r = fallback.select_fallback(model, float_linears, ("auto", None), score, target=0.0, max_count=2, sensitivity=sens,
                             candidates=5)
    assert r["fp16_layers"] == ["l2", "l4"]  # by gain (5, 3), not SQNR order (l0, l1)
    assert r["candidates"] == 5 and "l5" not in r["gains"]  # pre-filter: the 5 lowest SQNR
    assert r["gains"]["l2"] == pytest.approx(5.0) and r["final_score"] == pytest.approx(1.0 + 1.3)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) == (n in r["fp16_layers"]) for n in names)
    assert len(calls) == 2 + 5 + 2  # float + quantized, one per candidate, one per greedy step
    # candidates=2: only l0, l1 are measured, so the big ones are never found
    for n in names:
        fallback._swap(model, n, torch.nn.Identity())
    r = fallback.select_fallback(model, float_linears, ("auto", None), score, target=0.0, max_count=2, sensitivity=sens,
                             candidates=2)
    assert r["fp16_layers"] == ["l0", "l1"]


class _Layers(torch.nn.Module):
    """model.layers.{i}.{a,b}: Identity stands for a quantized Linear, nn.Linear for its float copy (score below)."""

    def __init__(self, n, roles):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for _ in range(n):
            m = torch.nn.Module()
            for r in roles:
                m.add_module(r, torch.nn.Identity())
            self.layers.append(m)


def test_fallback_auto_screens_roles_before_sqnr():
    """Role screening: the high-SQNR role whose Linears matter end to end fills the candidate pool; with the
    SQNR pre-filter alone (the previous criterion) only the low-SQNR, low-gain role would be measured."""
    model = _Layers(4, ("a", "b"))
    names = [f"layers.{i}.{r}" for i in range(4) for r in ("a", "b")]
    float_linears = {n: torch.nn.Linear(1, 1) for n in names}
    cost = {n: (0.1 if n.endswith(".a") else 2.0 + 0.1 * int(n.split(".")[1])) for n in names}

    def score(m):
        return 1.0 + sum(c for n, c in cost.items() if isinstance(m.get_submodule(n), torch.nn.Identity))

    sens = {n: (10.0 if n.endswith(".a") else 40.0) + int(n.split(".")[1]) for n in names}  # role a: worst SQNR
    assert fallback.role_of("model.layers.11.mlp.down_proj") == "model.layers.*.mlp.down_proj"
    r = fallback.select_fallback(model, float_linears, ("auto", None), score, target=0.0, max_count=2, sensitivity=sens,
                             candidates=3)
    assert r["role_gains"] == {"layers.*.a": pytest.approx(0.1), "layers.*.b": pytest.approx(2.15)}
    assert set(r["gains"]) == {"layers.0.b", "layers.1.b", "layers.2.b"}  # the pool: role b, SQNR order within it
    assert r["fp16_layers"] == ["layers.2.b", "layers.1.b"]
    assert r["tried"] == 2 + 3 + 2  # roles, candidates alone, greedy steps (float and quantized not counted)


class _NoisyPpl:
    """A score whose window perplexity meets a 5 % target as a point estimate after one fallback, but whose upper
    confidence bound stays above it until everything is float (few, noisy windows)."""

    def __init__(self, names, cost, with_bound=True):
        self.names, self.cost, self.with_bound = names, cost, with_bound
        self.last_ppl = self.last_ppl_upper = None

    def __call__(self, m):
        q = [n for n in self.names if isinstance(m.get_submodule(n), torch.nn.Identity)]
        v = 1.0 + sum(self.cost[n] for n in q)
        self.last_ppl = 10.0 * (1 + 0.01 * sum(self.cost[n] for n in q))
        if self.with_bound:
            self.last_ppl_upper = self.last_ppl * (1.1 if q else 1.0)
        return v


def test_fallback_auto_stops_early_only_when_the_target_holds_beyond_window_noise():
    names = [f"l{i}" for i in range(5)]
    model = torch.nn.Module()
    for n in names:
        model.add_module(n, torch.nn.Identity())
    cost = {"l0": 8.0, "l1": 1.0, "l2": 0.5, "l3": 0.25, "l4": 0.0}
    fl = {n: torch.nn.Linear(1, 1) for n in names}
    r = fallback.select_fallback(model, fl, ("auto", None), _NoisyPpl(names, cost), target=0.05, max_count=3)
    assert r["fp16_layers"] == ["l0", "l1", "l2"] and not r["met"]  # spends the budget while the score improves
    assert r["final_ppl"] <= r["goal"] < r["final_ppl_upper"]
    for n in names:
        fallback._swap(model, n, torch.nn.Identity())
    r = fallback.select_fallback(model, fl, ("auto", None), _NoisyPpl(names, cost, with_bound=False), target=0.05, max_count=3)
    assert r["fp16_layers"] == ["l0"] and r["met"]  # a score without a bound: the point estimate decides


def test_ppl_upper_bound():
    g = torch.Generator().manual_seed(0)
    f = [torch.rand(200, generator=g) * 4 for _ in range(2)]
    assert fallback.ppl_upper_bound(f, f) == pytest.approx(math.exp(float(torch.cat(f).mean())))
    q = [x + 0.05 + 0.5 * torch.randn(200, generator=g) for x in f]
    point = math.exp(float(torch.cat(q).mean()))
    up = fallback.ppl_upper_bound(q, f)
    assert up > point and fallback.ppl_upper_bound(q, f, z=0.0) == pytest.approx(point)
    q4 = q + [x + 0.05 + 0.5 * torch.randn(200, generator=g) for x in f]  # twice the tokens: a tighter bound
    assert fallback.ppl_upper_bound(q4, f + f) / math.exp(float(torch.cat(q4).mean())) < up / point


def test_kl_score_prefix_cache_is_exact_and_skips_the_layers_below():
    model, fam = _llama_down_outliers()
    wins = token_batches(2, 32, seed=4)
    names = fam.quantized_linears()
    m, fl = _quantized_copy(model, fam)
    qm = {n: m.get_submodule(n) for n in names}
    cached, plain = fallback.KLScore(wins, layers_path=fam.layers_path), fallback.KLScore(wins)
    cached.reference(model)
    plain.reference(model)
    with pytest.raises(ValueError):
        cached(m, start=1)  # nothing committed yet
    cached(m)
    cached.commit()
    layer0 = m.get_submodule(fam.layers_path)[0]
    calls = []
    h = layer0.register_forward_hook(lambda *_: calls.append(1))
    top = names[-1]
    assert cached.layer_of(top) == fam.num_layers() - 1 == 1 and cached.layer_of("lm_head") == 0
    fallback._swap(m, top, fl[top])
    part = cached(m, start=1)
    assert calls == [] and isinstance(m.get_submodule(fam.layers_path)[0], type(layer0))  # replayed, then restored
    assert part == pytest.approx(plain(m), abs=1e-9) and len(calls) == 2
    assert cached.last_ppl == pytest.approx(plain.last_ppl, rel=1e-9)
    h.remove()
    fallback._swap(m, top, qm[top])
    # the whole search gives the same choice and scores with the cache as without it
    res = []
    for sc in (fallback.KLScore(wins, layers_path=fam.layers_path), fallback.KLScore(wins)):
        mm = copy.deepcopy(m)
        r = fallback.select_fallback(mm, {n: copy.deepcopy(fl[n]) for n in names}, ("auto", None), sc, target=0.0,
                                 max_count=3, candidates=6)
        res.append((r["fp16_layers"], r["final_score"], sorted(r["gains"].items())))
    assert res[0][0] == res[1][0] and len(res[0][0]) >= 1
    assert res[0][1] == pytest.approx(res[1][1], abs=1e-9)
    assert [g for _, g in res[0][2]] == pytest.approx([g for _, g in res[1][2]], abs=1e-9)


def test_kl_score_is_zero_for_float_and_tracks_perplexity():
    model, fam = _llama_down_outliers()
    wins = token_batches(2, 32, seed=4)
    kl = fallback.KLScore(wins)
    kl.reference(model)
    assert abs(kl(model)) < 1e-3
    assert kl.last_ppl == pytest.approx(fallback.windows_perplexity(model, wins), rel=1e-3)
    m = copy.deepcopy(model)
    names = fam.quantized_linears()
    quantize_model(m, names, "static", static_scales(calibrate(model, fam, token_batches(4, 32)), names))
    assert kl(m) > 1e-3 and kl.last_ppl != pytest.approx(fallback.windows_perplexity(model, wins), rel=1e-3)


def test_max_fallback_and_percent_parsing():
    assert recipe_mod.max_fallback_count("10%", 210) == 21
    assert recipe_mod.max_fallback_count("10%", 3) == 1
    assert recipe_mod.max_fallback_count("4", 210) == 4
    assert recipe_mod.parse_percent("2%", "x") == recipe_mod.parse_percent("2", "x") == 0.02
    assert recipe_mod.parse_fallback("auto") == ("auto", None) and recipe_mod.parse_fallback(None) is None


# ----- CLI ------------------------------------------------------------------------------------------------------
CAL = ["--samples", "4", "--calib-seq-len", "32"]


def _cli(capsys, *argv):
    from sq_export.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_export_check_with_tuning(tiny_dirs, small_text, tmp_path, capsys):
    d = tiny_dirs("llama")
    calib = small_text / "calib.txt"
    code, out, err = _cli(capsys, "-q", "eval", d, "--smooth-pairs", "--alpha", "auto", "--clip", "p99.9", "--fallback", "2",
                          "--text", small_text / "eval.txt", "--calib-text", calib, *CAL, "--seq-len", "64", "--max-tokens", "256", "--json")
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["alpha"] == "auto" and r["smooth_pairs"] and r["clip"] == "p99.9"
    assert len(r["alpha_per_group"]) == 4 * 2 and len(r["fp16_layers"]) == 2 and r["quantized_layers_total"] == 14 - 2

    name = "model.layers.1.mlp.down_proj"
    onnx_path = tmp_path / "fb.onnx"
    code, out, err = _cli(capsys, "-q", "export", d, "-o", onnx_path, "--smooth-pairs", "--fallback", name, "--calib-text", calib, *CAL, "--json")
    assert code == 0, err
    from sq_export.onnxio.meta import read_metadata

    meta = read_metadata(onnx_path)
    assert meta["fp16_layers"] == name and meta["quantized_layers_total"] == "13" and meta["smooth_pairs"] == "1"
    code, out, err = _cli(capsys, "-q", "check", onnx_path)
    assert code == 0, out + err
    import onnx

    g = onnx.load(str(onnx_path)).graph
    float_mm = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and not any("DequantizeLinear" in i or "dq" in i.lower() for i in n.input)]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert float_mm and dq
    # ONNX Runtime perplexity path reads the fallback list back
    code, out, err = _cli(capsys, "-q", "eval", onnx_path, "--text", small_text / "eval.txt", "--seq-len", "64", "--max-tokens", "128", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["fp16_layers"] == [name]


def test_cli_rejects_bad_tuning_options(tiny_dirs, capsys):
    d = tiny_dirs("llama")
    assert _cli(capsys, "eval", d, "--clip", "p10")[0] == 2
    assert _cli(capsys, "eval", d, "--fallback", "model.nope", "--samples", "2", "--calib-seq-len", "16", "--max-tokens", "64")[0] == 2
    assert _cli(capsys, "run", d, "-o", "/tmp/never_sq", "--clip", "p10")[0] == 2


def test_diagnose(tiny_dirs, small_text, tmp_path, capsys):
    d = tiny_dirs("opt")
    code, out, err = _cli(capsys, "-q", "diagnose", d, "--calib-text", small_text / "calib.txt", *CAL, "--windows", "1", "-o", tmp_path / "diag", "--json")
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    rows = r["rows"]
    assert len(rows) == 12 and (tmp_path / "diag" / "sqnr.png").stat().st_size > 1000
    sq = [x["sq_db"] for x in rows]
    assert sq == sorted(sq)  # worst first
    assert r["mean_sqnr_db"]["sq"] > r["mean_sqnr_db"]["naive"]  # the injected outliers hurt naive more


def test_diagnose_with_pairs_compares_with_the_smoothed_float_model(tiny_dirs, small_text, capsys):
    # pair smoothing divides up_proj/v_proj output rows: their SQ outputs must be compared with the smoothed float
    # model, not the original (that would report ~0 dB for a correct model)
    d = tiny_dirs("llama")
    code, out, err = _cli(capsys, "-q", "diagnose", d, "--smooth-pairs", "--calib-text", small_text / "calib.txt", *CAL, "--windows", "1", "--json")
    assert code == 0, err
    rows = {r["linear"]: r for r in json.loads(out.strip().splitlines()[-1])["rows"]}
    for n, r in rows.items():
        if n.endswith(("up_proj", "v_proj")):
            assert r["sq_db"] > 10, (n, r)


def test_first_order_gains_rank_like_measured_gains_and_leave_the_model_alone():
    """The one-backward-pass estimate of each Linear's KL gain agrees in sign and order with the gains measured one
    Linear at a time (the tiny Llama whose down_proj inputs carry injected outliers), and the pass changes neither
    the model's outputs nor its parameters' requires_grad."""
    model, fam = _llama_down_outliers()
    wins = token_batches(2, 32, seed=4)
    names = fam.quantized_linears()
    m, fl = _quantized_copy(model, fam)
    kl = fallback.KLScore(wins)
    kl.reference(model)
    q0 = kl(m)
    before = [p.requires_grad for p in m.parameters()]
    est = kl.first_order_gains(m, fl)
    assert kl(m) == q0 and [p.requires_grad for p in m.parameters()] == before and any(before)
    measured = {}
    for n in names:
        q = m.get_submodule(n)
        fallback._swap(m, n, fl[n])
        measured[n] = q0 - kl(m)
        fallback._swap(m, n, q)
    top = max(measured, key=measured.get)
    assert measured[top] > 0.2 * q0  # the outlier Linear dominates
    # KL is nearly quadratic in the error, so the slope at the quantized point counts a Linear's share about twice
    assert max(est, key=est.get) == top and 1.0 < est[top] / measured[top] < 4.0
    # rank agreement over every Linear (Spearman)
    r_m = {n: i for i, n in enumerate(sorted(names, key=measured.get))}
    r_e = {n: i for i, n in enumerate(sorted(names, key=est.get))}
    k = len(names)
    rho = 1 - 6 * sum((r_m[n] - r_e[n]) ** 2 for n in names) / (k * (k * k - 1))
    assert rho > 0.6, rho


def test_select_fallback_first_order_ranking_picks_the_outlier_linear():
    model, fam = _llama_down_outliers()
    wins = token_batches(2, 32, seed=4)
    res = {}
    for ranking in ("first-order", "measured"):
        m, fl = _quantized_copy(model, fam)
        sc = fallback.KLScore(wins, layers_path=fam.layers_path)
        res[ranking] = fallback.select_fallback(m, fl, ("auto", None), sc, target=0.0, max_count=2, candidates=4,
                                                ranking=ranking)
    fo, me = res["first-order"], res["measured"]
    assert fo["ranking"] == "first-order" and me["ranking"] == "measured"
    assert fo["fp16_layers"][0] == me["fp16_layers"][0]
    assert fo["final_score"] < 0.5 * fo["quant_score"]
    assert fo["tried"] < me["tried"]


@pytest.mark.parametrize("family", FAMILIES)
def test_first_order_gains_layer_by_layer_equal_the_whole_graph(family):
    """The layer-at-a-time backward pass (recorded layer inputs, each layer recomputed and back-propagated alone)
    gives the whole-graph estimates, on every family's tiny model (their layers take different arguments)."""
    model, fam = make_tiny(family)
    names = fam.quantized_linears()
    m = copy.deepcopy(model)
    fl = {n: copy.deepcopy(m.get_submodule(n)) for n in names}
    quantize_model(m, names, "static", static_scales(calibrate(model, fam, token_batches(2, 16)), names))
    wins = token_batches(2, 24, seed=5)
    ref, _ = fallback.float_reference(model, wins)
    whole = fallback.first_order_gains(m, fl, wins, ref)
    by_layer = fallback.first_order_gains(m, fl, wins, ref, fam.layers_path)
    assert set(whole) == set(by_layer) == set(names)
    scale = max(abs(v) for v in whole.values())
    assert scale > 0
    for n in names:
        assert by_layer[n] == pytest.approx(whole[n], rel=1e-3, abs=1e-4 * scale), n


def test_kl_score_and_first_order_gains_do_not_depend_on_the_token_chunk(monkeypatch):
    model, fam = _llama_down_outliers()
    wins = token_batches(2, 32, seed=4)
    m, fl = _quantized_copy(model, fam)
    out = []
    for chunk in (1000, 5):
        monkeypatch.setattr(fallback, "KL_CHUNK", chunk)
        kl = fallback.KLScore(wins, layers_path=fam.layers_path)
        kl.reference(model)
        out.append((kl(m), kl.last_ppl, kl.last_ppl_upper, kl.first_order_gains(m, fl)))
    (a, pa, ua, ga), (b, pb, ub, gb) = out
    assert b == pytest.approx(a, rel=1e-5) and pb == pytest.approx(pa, rel=1e-6) and ub == pytest.approx(ua, rel=1e-6)
    assert [gb[n] for n in ga] == pytest.approx([ga[n] for n in ga], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_first_order_gains_layer_by_layer_after_an_outlier_prefix(family):
    """With an outlier prefix installed, every layer's recorded call holds the KV cache it appended to: the
    layer-at-a-time pass replays each layer after a fresh prefix cache (decoder_layers.replay_kwargs) and gives
    the whole-graph estimates (it had replayed the grown cache: a shape error on SmolLM2's --fallback auto); and
    the per-layer smoothing check replays the same way."""
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.equivalence import layer_outputs_f32, record_layer_inputs

    model, fam = make_tiny(family)
    names = fam.quantized_linears()
    pre = prefix_mod.compute_prefix(model, [1, 7, 9])
    m = copy.deepcopy(model)
    fl = {n: copy.deepcopy(m.get_submodule(n)) for n in names}
    quantize_model(m, names, "static", static_scales(calibrate(model, fam, token_batches(2, 16)), names))
    wins = token_batches(2, 24, seed=5)
    prefix_mod.install(model, pre)
    prefix_mod.install(m, pre)
    ref, _ = fallback.float_reference(model, wins)
    whole = fallback.first_order_gains(m, fl, wins, ref)
    by_layer = fallback.first_order_gains(m, fl, wins, ref, fam.layers_path)
    scale = max(abs(v) for v in whole.values())
    assert scale > 0
    for n in names:
        assert by_layer[n] == pytest.approx(whole[n], rel=1e-3, abs=1e-4 * scale), n
    # replaying the recorded calls twice gives the same outputs (each replay starts from the prefix alone)
    inputs = record_layer_inputs(model, fam, torch.as_tensor(token_batches(2, 12, seed=3)))
    a, b = layer_outputs_f32(model, fam, inputs), layer_outputs_f32(model, fam, inputs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
