"""The one function that turns a float model into its quantized form for a recipe: `prepare` (calibrate or take
calibration statistics, search α, smooth with the float-equivalence check, clip, swap Linears for QLinears, fall
back); `working_copy` gives a copy to prepare that shares every tensor preparation does not write."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from sq_export.errors import BadInput
from sq_export.quant.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model: object
    tokenizer: object
    family: object
    alpha: float | None
    quantized: list
    times: dict
    act_max: dict | None = None
    factors: dict | None = None
    smooth_delta: float | None = None
    alpha_per_group: dict | None = None
    fp16_layers: list = field(default_factory=list)
    tune: dict = field(default_factory=dict)


@dataclass
class CalibStats:
    """Calibration results that `prepare` can take instead of calibrating (tools that evaluate many recipes)."""

    act_max: dict
    reservoir: object | None = None


def get_act_max(model, family, tokenizer, recipe: Recipe):
    from sq_export.quant.calibrate import load_act_scales, run_calibration, validate_act_scales

    if recipe.act_scales:
        d = load_act_scales(recipe.act_scales)
        validate_act_scales(d, model, family, f"act scales {recipe.act_scales}")
        return d, None
    c = recipe.calib
    d, meta = run_calibration(model, family, tokenizer, c.calib_text, c.samples, c.seq_len, c.batch_size)
    return d, meta


def check_batch(tokenizer, recipe: Recipe) -> torch.Tensor:
    """A small calibration batch for the float-equivalence check (first window of the calibration windows)."""
    from sq_export.textdata import calibration_samples, token_ids

    ids = token_ids(tokenizer, recipe.calib.calib_text, "calib")
    return torch.as_tensor(calibration_samples(ids, 2, min(128, recipe.calib.seq_len, len(ids))))


def get_rows(model, family, tokenizer, recipe: Recipe):
    """act max + a bounded row sample per Linear input in one calibration pass (act scales from a file: the row
    sample still needs one pass over the calibration windows; the file's maxima are kept)."""
    from sq_export.quant.calibrate import run_calibration
    from sq_export.quant.reservoir import new_reservoir

    res = new_reservoir(family, recipe.reservoir_rows)
    c = recipe.calib
    if recipe.act_scales:
        d, _ = get_act_max(model, family, tokenizer, recipe)
        run_calibration(model, family, tokenizer, c.calib_text, c.samples, c.seq_len, c.batch_size, reservoir=res)
        return d, res
    d, _ = run_calibration(model, family, tokenizer, c.calib_text, c.samples, c.seq_len, c.batch_size, reservoir=res)
    return d, res


def prepare(model, tokenizer, family, recipe: Recipe, stats: CalibStats | None = None, fallback_score=None) -> Prepared:
    """Calibrate, smooth (mode sq) and swap Linears for QLinears (mode naive/sq), in place.

    `stats`: calibration already done (must come from this unsmoothed model with the same options; prepare does
    not change it). `fallback_score(model) -> float` (lower is better) replaces the default criterion of
    `--fallback auto` (fallback.KLScore: mean KL to the float model on fallback.FALLBACK_WINDOWS calibration-split windows;
    a callable with `reference(model)` / `last_ppl` / `last_ppl_upper` is used the same way)."""
    from sq_export.quant.qlinear import quantize_model, static_scales
    from sq_export.quant.smooth import smooth_checked, smoothed_act_max
    from sq_export.quant import alpha as alpha_search, clip as clipping, fallback, smooth as smoothing
    recipe.validate()
    times = {}
    alpha = recipe.alpha if recipe.alpha is not None else family.default_alpha
    searched = None
    if isinstance(alpha, dict):  # the α per group an earlier --alpha auto search chose: use them, as "auto"
        searched, alpha = dict(alpha), "auto"
    if recipe.mode == "fp":
        return Prepared(model, tokenizer, family, None, [], times)
    fb = fallback.parse_fallback(recipe.fallback)
    if fb and fb[0] == "names":  # refuse unknown names before the (long) calibration
        known = set(family.quantized_linears())
        bad = [n for n in fb[1] if n not in known]
        if bad:
            raise BadInput(f"--fallback: {bad[0]} is not a quantized Linear of this model (e.g. {family.quantized_linears()[0]})")
    need_calib = recipe.mode == "sq" or recipe.act == "static" or recipe.needs_rows()
    act_max = factors = delta = res = None
    alpha_per_group = None
    info = {}
    if need_calib:
        t = time.perf_counter()
        if stats is not None:
            act_max, res = stats.act_max, stats.reservoir
            if recipe.needs_rows() and res is None:
                raise BadInput("this recipe needs a calibration row sample (CalibStats.reservoir)")
        elif recipe.needs_rows():
            act_max, res = get_rows(model, family, tokenizer, recipe)
        else:
            act_max, _ = get_act_max(model, family, tokenizer, recipe)
        times["calibrate_s"] = time.perf_counter() - t
    if recipe.mode == "sq":
        t = time.perf_counter()
        if alpha == "auto" and searched is not None:
            alpha_per_group = searched
        elif alpha == "auto":
            alpha_per_group = alpha_search.search_alpha(model, family, act_max, res, recipe.linear_pairs, per_channel=recipe.per_channel)
            times["alpha_search_s"] = time.perf_counter() - t
        a = alpha_per_group if alpha == "auto" else alpha
        factors, delta = smooth_checked(model, family, act_max, a, check_batch(tokenizer, recipe), linear_pairs=recipe.linear_pairs)
        act_max = smoothed_act_max(act_max, family, factors, recipe.linear_pairs)
        times["smooth_s"] = time.perf_counter() - t
    names = family.quantized_linears()
    divs = smoothing.divisors(family, factors, recipe.linear_pairs)
    scales = None
    if recipe.act == "static":
        clip = clipping.parse_clip(recipe.clip)
        if clip is None:
            scales = static_scales(act_max, names)
        else:
            t = time.perf_counter()
            scales, ratio = clipping.clipped_scales(family, act_max, res, divs, clip, names)
            info["clip_ratio"] = ratio
            times["clip_s"] = time.perf_counter() - t
    # kept only for --fallback (it puts float Linears back); a QLinear holds its float Linear's weight itself (a view,
    # not a copy), so the float and the quantized weights are one tensor either way
    float_linears = {n: model.get_submodule(n) for n in names} if fb is not None else {}
    quantized = quantize_model(model, names, recipe.act, scales, recipe.per_channel)
    fp16 = []
    if fb is not None:
        t = time.perf_counter()
        sens = fallback.local_sqnr(model, family, float_linears, res, divs) if fb[0] != "names" else None
        score = fallback_score
        if score is None and fb[0] == "auto":
            wins = fallback.small_eval_ids(tokenizer, recipe.calib.calib_text, recipe.calib.seq_len, windows=fallback.FALLBACK_WINDOWS)
            score = fallback.KLScore(wins, layers_path=family.layers_path)
        r = fallback.select_fallback(model, float_linears, fb, score, target=recipe.target_ppl_increase,
                                 max_count=fallback.max_fallback_count(recipe.max_fallback, len(quantized)), sensitivity=sens)
        fp16 = r["fp16_layers"]
        info["fallback"] = {k: v for k, v in r.items() if k != "fp16_layers"}
        quantized = [n for n in quantized if n not in set(fp16)]
        times["fallback_s"] = time.perf_counter() - t
    return Prepared(model, tokenizer, family, alpha if recipe.mode == "sq" else None, quantized, times, act_max, factors, delta,
                    alpha_per_group, fp16, info)


def working_copy(model, family, *, smoothing: bool, linear_pairs: bool = False):
    """A copy of `model` to prepare (smooth, quantize) without touching `model`, sharing every tensor that
    preparation only reads: smoothing (`smoothing`) writes in place into the norms and Linears of the smoothing
    groups (with `linear_pairs` also the pair producers and consumers), and only those are copied; quantizing swaps
    modules (a QLinear views the weight it replaces) and writes no tensor. The embeddings (and a tied LM head), the
    other norms and, for naive W8A8, every weight stay shared with `model`: the copy costs what it changes."""
    import copy

    written = set()
    if smoothing:
        for g in family.groups(include_linear_pairs=linear_pairs):
            written.add(g.source)
            written.update(g.linears)
    memo = {}
    for name, mod in model.named_modules():
        if name not in written:
            for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
                memo[id(t)] = t
    return copy.deepcopy(model, memo)
