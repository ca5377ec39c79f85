"""The one function that turns a float model into its quantized form for a recipe.

    calib = calibrate_for(model, family, tokenizer, recipe)      # sq_export.quant.calibrate
    prep = prepare(model, family, recipe, calib)                 # in place; `working_copy` first to keep the float model

`prepare` runs the whole chain in order: α search (--alpha auto), smoothing with the float-equivalence check (the
model must give the same float logits, or SmoothingChangedOutputs), static scales (clipped with --clip), Linears →
QLinears, float fallback (--fallback), attention Q/DQ (--quantize-attention) and the W8A8 LM head
(--quantize-lm-head), the last two calibrated on the prepared model over the same calibration windows. Every
command and the Python API go through it, so a recipe means one thing wherever it runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sq_export.errors import BadInput
from sq_export.quant.calibrate import Calibration
from sq_export.quant.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What `prepare` decided (the model itself is changed in place)."""

    model: object
    family: object
    recipe: Recipe
    alpha: float | str | None  # the α used (a number, or "auto" with alpha_per_group); None unless mode sq
    quantized: list  # the Linears that are W8A8
    times: dict
    act_max: dict | None = None  # static ranges after smoothing
    factors: dict | None = None  # {smoothing group source: s}
    smooth_delta: float | None = None  # max |Δ float logits| of the smoothing check
    alpha_per_group: dict | None = None
    fp16_layers: list = field(default_factory=list)  # Linears kept in float (--fallback)
    tune: dict = field(default_factory=dict)  # clip ratios, the fallback search's record
    graph_meta: dict = field(default_factory=dict)  # attention / LM head facts for the ONNX metadata
    prefix: object | None = None  # the outlier prefix the model runs after (sq_export.quant.prefix.OutlierPrefix)

    def decisions(self) -> Recipe:
        """The recipe with its searches' results filled in (α per group, the fallback's Linears): preparing another
        copy of the same float model with it, on the same calibration, gives the same model without searching."""
        import dataclasses

        r = self.recipe
        if self.alpha_per_group is not None:
            r = dataclasses.replace(r, alpha=dict(self.alpha_per_group))
        if r.fallback_spec() is not None:
            r = dataclasses.replace(r, fallback=",".join(self.fp16_layers) or None)
        return r

    def summary(self) -> dict:
        d = {"recipe": self.recipe.describe(), "alpha": self.alpha, "alpha_per_group": self.alpha_per_group,
             "quantized_linears": len(self.quantized), "fp16_layers": list(self.fp16_layers), **self.graph_meta}
        if self.prefix is not None:
            d["prefix_outliers"] = self.prefix.summary()
        return d


def prepare(model, family, recipe: Recipe, calib: Calibration | None, fallback_score=None) -> Prepared:
    """Smooth (mode sq) and swap Linears for QLinears (mode naive/sq) of `model` in place, with `calib` (from this
    unsmoothed model, with the recipe's options; prepare does not change it). `fallback_score(model) -> float`
    (lower is better) replaces the default criterion of `--fallback auto` (fallback.KLScore: mean KL to the float
    model on fallback.FALLBACK_WINDOWS calibration-split windows; a callable with `reference(model)` / `last_ppl` /
    `last_ppl_upper` is used the same way)."""
    from sq_export.quant import alpha as alpha_search, clip as clipping, fallback, recipe as recipe_mod, smooth as smoothing
    from sq_export.quant.qlinear import quantize_model, static_scales

    from sq_export.quant import prefix as prefix_mod

    recipe.validate()
    times = {}
    pre = calib.prefix if calib is not None else None
    if recipe.prefix_spec() is not None and pre is None:
        raise BadInput("the recipe sets --prefix-outliers but the calibration has no prefix: calibrate with the same recipe")
    if recipe.prefix_spec() is None and pre is not None and recipe.mode != "fp":
        raise BadInput("the calibration ran after an outlier prefix but the recipe sets no --prefix-outliers: the static "
                       "scales hold only without the prefix's tokens; use the same --prefix-outliers for both")
    if pre is not None:
        prefix_mod.install(model, pre)
    if recipe.mode == "fp":
        return Prepared(model, family, recipe, None, [], times, prefix=pre)
    alpha = recipe.alpha if recipe.alpha is not None else family.default_alpha
    searched = None
    if isinstance(alpha, dict):  # the α per group an earlier --alpha auto search chose: use them, as "auto"
        searched, alpha = dict(alpha), "auto"
    fb = recipe.fallback_spec()
    if fb and fb[0] == "names":  # refuse unknown names before anything long
        known = set(family.quantized_linears())
        bad = [n for n in fb[1] if n not in known]
        if bad:
            raise BadInput(f"--fallback: {bad[0]} is not a quantized Linear of this model (e.g. {family.quantized_linears()[0]})")
    if alpha == "kl" and recipe.mode == "sq" and (calib is None or calib.ids is None):
        raise BadInput("--alpha kl scores on calibration-split windows: calibrate from text (not --act-scales alone)")
    if alpha == "kl" and recipe.mode == "sq" and not recipe.linear_pairs:
        raise BadInput("--alpha kl chooses the α of the Linear pairs (up→down, v→o): it needs --smooth-pairs")
    if recipe.needs_calibration() and calib is None:
        raise BadInput("this recipe needs calibration statistics (sq_export.quant.calibrate)")
    act_max = res = None
    if calib is not None:
        act_max, res = calib.act_max, calib.reservoir
        if recipe.needs_rows() and res is None:
            raise BadInput("this recipe (alpha auto, clip or fallback) needs a calibration row sample: calibrate with rows")
    rot_names = rot_h = None
    if recipe.rotate_down:  # the Linears whose input is rotated and the block (their widths checked before any work)
        from sq_export.quant import hadamard

        rot_names = hadamard.targets(family)
        rot_h = hadamard.check_block(model, rot_names, recipe.rotate_down)
    factors = delta = alpha_per_group = None
    info = {}
    if recipe.mode == "sq":
        t = time.perf_counter()
        if alpha == "auto" and searched is not None:
            alpha_per_group = searched
        elif alpha == "auto":
            alpha_per_group = alpha_search.search_alpha(model, family, act_max, res, recipe.linear_pairs, per_channel=recipe.per_channel)
            times["alpha_search_s"] = time.perf_counter() - t
        elif alpha == "kl":  # one α per pair kind, by the KL to the float model on the fallback's scoring windows
            kl_score = fallback.KLScore(calib.scoring_windows(fallback.FALLBACK_WINDOWS), layers_path=family.layers_path)
            kl_score.reference(model)
            # with --rotate-down each trial is rotated, so the α chosen is the best one with the rotation
            rot_search = (rot_names, rot_h, calib.windows(), recipe.calib.batch_size) if rot_names else None
            alpha_per_group, info["alpha_kl"] = alpha_search.search_alpha_kl(
                model, family, act_max, kl_score, recipe.linear_pairs, family.default_alpha, per_channel=recipe.per_channel,
                prefix=pre, rotate=rot_search)
            times["alpha_search_s"] = time.perf_counter() - t
        a = alpha_per_group if alpha in ("auto", "kl") else alpha

        def refresh_prefix():  # the prefix's cache as the smoothed float model computes it (v→o pairs scale V's rows)
            nonlocal pre
            pre = prefix_mod.compute_prefix(model, pre.tokens, info=pre.info)
            pre.text = calib.prefix.text
            prefix_mod.install(model, pre)

        factors, delta = smoothing.smooth_checked(model, family, act_max, a, calib.check_batch(), linear_pairs=recipe.linear_pairs,
                                                  after=refresh_prefix if pre is not None else None)
        act_max = smoothing.smoothed_act_max(act_max, family, factors, recipe.linear_pairs)
        times["smooth_s"] = time.perf_counter() - t
    names = family.quantized_linears()
    divs = smoothing.divisors(family, factors, recipe.linear_pairs)
    scales = None
    if recipe.act == "static":
        clip = recipe_mod.parse_clip(recipe.clip)
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
    rot = None
    if rot_names:  # the rotated inputs' ranges, on the smoothed float model (after the prefix, if any)
        t = time.perf_counter()
        if calib is None:
            raise BadInput("--rotate-down calibrates the rotated inputs' ranges: it needs calibration windows")
        rot = (rot_names, rot_h, hadamard.rotated_maxima(model, rot_names, rot_h, calib.windows(), recipe.calib.batch_size))
        times["rotate_calibrate_s"] = time.perf_counter() - t
    quantized = quantize_model(model, names, recipe.act, scales, recipe.per_channel)
    if rot is not None:
        rotated = hadamard.rotate_inputs(model, rot[0], rot[1], rot[2], recipe.per_channel)
        info["rotate_down"] = {"block": recipe.rotate_down, "linears": len(rotated)}
    fp16 = []
    if fb is not None:
        t = time.perf_counter()
        score = fallback_score
        if score is None and fb[0] == "auto":
            score = fallback.KLScore(calib.scoring_windows(fallback.FALLBACK_WINDOWS), layers_path=family.layers_path)
        # the N least-SQNR Linears for --fallback N; for auto only the measured ranking's order within a role
        # (the first-order ranking orders every Linear itself)
        need_sqnr = fb[0] == "n" or (fb[0] == "auto" and not fallback.ranks_first_order(score))
        sens = fallback.local_sqnr(model, family, float_linears, res, divs) if need_sqnr else None
        r = fallback.select_fallback(model, float_linears, fb, score, target=recipe.target_ppl_increase,
                                     max_count=recipe_mod.max_fallback_count(recipe.max_fallback, len(quantized)), sensitivity=sens)
        fp16 = r["fp16_layers"]
        info["fallback"] = {k: v for k, v in r.items() if k != "fp16_layers"}
        quantized = [n for n in quantized if n not in set(fp16)]
        times["fallback_s"] = time.perf_counter() - t
    graph_meta = {}
    if rot is not None:  # the fallback's float Linears are not rotated: the graph check counts the rotated ones
        kept = set(quantized)
        graph_meta = hadamard.metadata(recipe.rotate_down, sum(n in kept for n in rotated))
    if recipe.quantize_attention:
        from sq_export.quant.attention import quantize_attention

        t = time.perf_counter()
        att = quantize_attention(model, family, calib.windows(), recipe.calib.batch_size)
        graph_meta.update({"quantize_attention": "static", "attention_layers": len(att)})
        times["attention_calibrate_s"] = time.perf_counter() - t
    if recipe.quantize_lm_head:
        from sq_export.quant.lm_head import quantize_lm_head

        t = time.perf_counter()
        head_alpha = (recipe.alpha if isinstance(recipe.alpha, float) else family.default_alpha) if recipe.mode == "sq" else None
        h = quantize_lm_head(model, calib.windows(), recipe.calib.batch_size, recipe.per_channel, head_alpha, family.norm_form)
        graph_meta["quantize_lm_head"] = h["name"]
        if h["smoothed_into"]:
            graph_meta.update({"lm_head_smoothed_into": h["smoothed_into"], "lm_head_alpha": h["alpha"]})
        times["lm_head_calibrate_s"] = time.perf_counter() - t
    return Prepared(model, family, recipe, alpha if recipe.mode == "sq" else None, quantized, times, act_max, factors, delta,
                    alpha_per_group, fp16, info, graph_meta, pre)


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
