"""The stages of `sq-export run --stream`: the model is never loaded whole (a 7B-70B checkpoint, larger than host
or GPU memory). Each stage reads the checkpoint a decoder layer or a tensor at a time (sq_export.stream):

  calibrate  act_scales.safetensors        api.calibrate_streamed: the act maxima (the whole-model file, byte for
                                           byte on the CPU); no row sample (a whole model's would not fit in memory)
  smooth     smoothed/ (HF folder +        api.quantize_streamed with those maxima (not measured again): smooth and
             sq_quant.json),               quantize layer by layer (α per group, clip, --fallback N|NAMES); the
             channel_stats.safetensors     per-channel statistics for the report (weights read again one layer at a
                                           time, before and after smoothing)
  export     model.{fp,sq}.onnx            from placeholders (api.load_float / api.load_quantized, lazy): each weight
                                           read from its checkpoint when written; host memory ≈ one weight
  eval       eval.json                     PyTorch perplexity of the float and the quantized model, layer-streamed
                                           (sq_export.stream.perplexity: the whole-model value, bit for bit on the
                                           CPU), and the TensorRT engines' when built, each checked against its
                                           model's; ONNX Runtime and the per-Linear SQNR need whole models: skipped

The smooth stage still runs the float layers on the cached calibration batches, for what the calibrate stage does
not keep: with a recipe that needs the row sample (--alpha auto, the default; --clip; --fallback N) every batch,
each layer's rows taken as it goes and dropped after it (so that memory holds one layer's rows) and its float
outputs being the next layer's inputs; otherwise the first batch only, the input of each layer's float-equivalence
check. The maxima are the calibrate stage's, so nothing is measured twice (tests/test_run_stream.py counts).

check, build and report are the whole-model run's (they read files). naive and paper are not built: each would need
a streamed quantization of the whole checkpoint of its own. The stage records carry "stream": true, so a streamed
run and a whole-model run into the same OUT never take each other's outputs as up to date.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from sq_export.run.context import RunContext
from sq_export.run.options import ACT_SCALES, CALIB_ROWS, CHANNEL_STATS, PREFIX, SMOOTHED, engine_name, onnx_name

STREAM = {"stream": True}  # in every streamed stage's options

NOT_BUILT = "not built with --stream: it would need a streamed quantization of the whole checkpoint of its own"
SKIPPED = {
    "onnxruntime": "--stream: an ONNX Runtime session holds the whole graph in host memory; the TensorRT engines are "
                   "measured instead",
    "layer_sqnr": "--stream: the per-Linear SQNR runs the float, naive and quantized models whole (naive is not built)",
}


FALLBACK_NOTE = "none: the --stream default (the recipe's --fallback auto scores whole-model logits)"


def _calib_options(ctx: RunContext) -> dict:
    c = ctx.opts.calib
    return {"samples": c.samples, "calib_seq_len": c.seq_len, "calib_batch": c.batch_size}


# ----- calibrate ------------------------------------------------------------------------------------------------
def spec_calibrate(ctx: RunContext, torch_side: dict):
    return {"model": ctx.model_path, "calib_text": ctx.calib_text()}, {**_calib_options(ctx), **torch_side, **STREAM}


def run_calibrate(ctx: RunContext, staging: Path) -> dict:
    from sq_export import api
    from sq_export.quant.calibrate import save_act_scales

    o = ctx.opts
    c = o.calib
    calib = api.calibrate_streamed(ctx.model_arg, ctx.tokenizer(), Path(c.calib_text) if c.calib_text else None,
                                   samples=c.samples, seq_len=c.seq_len, batch_size=c.batch_size, rows=None,
                                   device=o.device, dtype=o.model_dtype)
    meta = dict(calib.meta)
    meta.pop("seconds", None)  # no times in artifacts
    save_act_scales(staging / ACT_SCALES, calib.act_max, {"model_type": api.model_type(ctx.model_path), **meta})
    for stale in (CALIB_ROWS, PREFIX):  # of an earlier whole-model calibration: must not be read
        (ctx.out / stale).unlink(missing_ok=True)
    return {"linears": len(calib.act_max), **meta, **STREAM}


# ----- smooth (+ quantize) --------------------------------------------------------------------------------------
def spec_smooth(ctx: RunContext, recipe_options: dict, torch_side: dict):
    """The streamed quantization takes the calibrate stage's act maxima (an input), samples its own rows as it goes
    when the recipe needs them (the calibration options are its options) and decides everything the recipe decides:
    α (per group), clip, --fallback N|NAMES; so all of them are its options."""
    r = ctx.recipe("sq")
    inputs = {"model": ctx.model_path, "act_scales": ctx.out / ACT_SCALES, "calib_text": ctx.calib_text()}
    rows = {"row_sample": r.reservoir_rows} if r.needs_rows() else {}
    return inputs, {**_calib_options(ctx), **rows, **recipe_options, **torch_side, **STREAM}


def _calibration(ctx: RunContext):
    """The calibrate stage's maxima with what they were taken on (act_scales.safetensors' metadata)."""
    from sq_export.quant.calibrate import Calibration, act_scales_meta, load_act_scales

    path = ctx.out / ACT_SCALES
    return Calibration(load_act_scales(path), options=ctx.opts.calib, meta=act_scales_meta(path))


def run_smooth(ctx: RunContext, staging: Path) -> dict:
    import torch

    from sq_export import api
    from sq_export.families import family_for
    from sq_export.quant.smooth import smoothed_act_max
    from sq_export.run.channel_stats import save_channel_stats
    from sq_export.stream.layers import build_skeleton
    from sq_export.stream.weight_stats import weight_channel_max

    o = ctx.opts
    r = ctx.recipe("sq")
    dest = staging / SMOOTHED
    t = time.perf_counter()
    res = api.quantize_streamed(ctx.model_arg, dest, r, tokenizer=ctx.tokenizer(), device=o.device, dtype=o.model_dtype,
                                calibration=_calibration(ctx))
    t_quant = round(time.perf_counter() - t, 2)
    # the report's per-channel statistics: act before (calibration) / after (÷ the factors), and max|W| per input
    # channel before / after smoothing, read one decoder layer at a time from the checkpoint and from smoothed/
    t = time.perf_counter()
    pairs = bool(r.linear_pairs)
    fam = family_for(build_skeleton(ctx.model_path, torch.float32))
    after = smoothed_act_max(res.act_max, fam, res.factors, pairs)
    w_before, w_after = weight_channel_max([ctx.model_path, dest], o.device, o.model_dtype)
    default_linear = save_channel_stats(staging / CHANNEL_STATS, fam, api.model_type(ctx.model_path), res.act_max, after,
                                        w_before, w_after, alpha=res.alpha, pairs=pairs, alpha_groups=res.alpha_per_group)
    summary = {"alpha": res.alpha, "smooth_pairs": pairs, "groups": len(res.factors),
               "max_layer_change": res.max_layer_change, "quantized_linears": len(res.quantized),
               "fp16_layers": list(res.fp16_layers), "default_report_linear": default_linear,
               "quantize_s": t_quant, "weight_stats_s": round(time.perf_counter() - t, 2), **STREAM}
    if res.alpha_per_group is not None:
        summary["alpha_per_group"] = res.alpha_per_group
    if o.stream_fallback_defaulted():
        summary["fallback"] = FALLBACK_NOTE
    return summary


# ----- export ---------------------------------------------------------------------------------------------------
def run_export(ctx: RunContext, staging: Path) -> dict:
    from sq_export import api
    from sq_export.memory import release_memory
    from sq_export.run.stages import split_graph

    o = ctx.opts
    summary = {}
    # a whole-model run's naive and paper graphs (and engines) in the same OUT would look like this run's: removed
    stale = [ctx.out / f for m in ("naive", "paper")
             for f in (onnx_name(m), onnx_name(m) + ".data", engine_name(m), engine_name(m) + ".json")]
    for f in stale:
        f.unlink(missing_ok=True)
    for mode in ctx.modes:
        if mode == "fp":
            # the run's calibration label in its metadata, as the whole-model run's float graph has (same bytes)
            qm = dataclasses.replace(api.load_float(ctx.model_arg, lazy=True), recipe=ctx.recipe("fp"))
        else:
            qm = api.load_quantized(ctx.out / SMOOTHED, lazy=True)
        res = api.export_onnx(qm, staging / onnx_name(mode), weights=o.weights, target=o.target)
        prep = qm.prepared
        summary[mode] = {"bytes": res.bytes, "nodes": res.nodes, "quantized_linears": len(prep.quantized),
                         "from_placeholders": True}
        split_graph(ctx, staging, mode, summary[mode])
        if mode == "sq":
            summary[mode]["fp16_layers"] = list(prep.fp16_layers)
            if prep.tune.get("clip_ratio"):
                summary[mode]["clip_ratio_min"] = min(prep.tune["clip_ratio"].values())
        del qm, prep
        release_memory()
    return summary


# ----- eval -----------------------------------------------------------------------------------------------------
def spec_eval(ctx: RunContext, graphs: dict, engines: dict, recipe_options: dict, torch_side: dict):
    inputs = {"model": ctx.model_path, "smoothed": ctx.out / SMOOTHED, "eval_text": ctx.eval_text()}
    inputs.update({f"onnx_{m}": p for m, p in graphs.items()})
    inputs.update({f"engine_{m}": p for m, p in engines.items()})
    return inputs, {"max_tokens": ctx.opts.max_tokens, "seq_len": ctx.opts.seq_len, "pytorch": "layer-streamed",
                    **recipe_options, **torch_side, **STREAM}


def run_eval(ctx: RunContext, staging: Path, built: dict) -> dict:
    """PyTorch perplexity of the float model (MODEL) and the quantized one (smoothed/), layer-streamed, and the
    TensorRT engines' when the build stage built them, each engine checked against its PyTorch model (run.stages.
    engine_agreement); what a streamed run does not measure is recorded with the reason (eval.json "skipped"), as
    are the models it does not build ("not_built")."""
    import numpy as np

    from sq_export.run.stages import engine_agreement, write_eval
    from sq_export.stream.perplexity import perplexity_streamed
    from sq_export.stream.quantize import read_quant_record
    from sq_export.textdata import token_ids

    o = ctx.opts
    ids = np.array(token_ids(ctx.tokenizer(), o.eval_text, "eval"))
    ppl: dict = {"pytorch": {}}
    secs: dict = {"pytorch": {}}
    skipped = dict(SKIPPED)
    for mode, folder in (("fp", ctx.model_path), ("sq", ctx.out / SMOOTHED)):
        t = time.perf_counter()
        r = perplexity_streamed(folder, ids, o.seq_len, o.max_tokens, device=o.device, dtype=o.model_dtype)
        ppl["pytorch"][mode], tokens = r["perplexity"], r["tokens"]
        secs["pytorch"][mode] = round(time.perf_counter() - t, 2)
    if built:
        from sq_export.engine import external
        from sq_export.engine.run import Tokens
        from sq_export.measure.perplexity import chunk_tokens

        toks = Tokens.from_chunks(chunk_tokens(ids, o.seq_len, o.max_tokens), "<eval text>")
        ppl["tensorrt"], secs["tensorrt"] = external.engines_perplexity(built, toks, python=o.trt_python)
    else:
        b = ctx.manifest["stages"].get("build") or {}
        skipped["tensorrt"] = f"no engine built ({b.get('reason') or 'the build stage did not run'})"
    engine_check = engine_agreement(ppl.get("tensorrt", {}), ppl["pytorch"], reference="pytorch")
    q = read_quant_record(ctx.out / SMOOTHED)
    main = ctx.recipe("sq")
    recipe = {
        "name": o.recipe,
        "describe": main.describe(),
        "alpha": q.get("alpha"),
        "alpha_per_group": q.get("alpha_per_group"),
        "smooth_pairs": main.linear_pairs,
        "clip": main.clip or "max",
        "fallback": main.fallback or None,
        **({"fallback_note": FALLBACK_NOTE} if o.stream_fallback_defaulted() else {}),
        "quantized_layers_total": len(q["quantized"]),
        "fp16_layers": list(q["fp16_layers"]),
    }
    write_eval(ctx, staging, recipe, tokens, ppl, engine_check, layer_sqnr_db=[], stream=True, skipped=skipped,
               not_built={m: NOT_BUILT for m in ("naive", "paper")})
    return {"tokens": tokens, "perplexity": ppl, "seconds": secs, "fp16_layers": recipe["fp16_layers"],
            "engine_vs_graph": engine_check, "skipped": sorted(skipped), **STREAM}
