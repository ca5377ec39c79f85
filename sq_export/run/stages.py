"""The stages of `sq-export run`, in order, each writing into OUT (the driver, sq_export.run.driver, stages them):

  calibrate  act_scales.safetensors                        per-channel max|x| at every quantized Linear input
             (+ calib_rows.safetensors)                     bounded row sample per Linear input, when the recipe
                                                           searches α, clips or falls back (sq_export.quant.reservoir)
  smooth     smoothed/ (HF folder), channel_stats.safetensors  the delivered recipe's smoothing (norms, and pairs
                                                           when on), α fixed or searched per group; float-equivalence
                                                           checked; per-channel stats for the report
  export     model.{fp,naive,paper,sq}.onnx                sq: the delivered recipe (default: the accurate one);
                                                           paper: the paper's setup; naive: plain static W8A8;
                                                           fp: the float reference (sq_export.quant.prepare)
  check      check.json                                    the graph passes on every quantized graph; violations fail
  build      model.*.engine (+ .json), build.json            TensorRT when importable, else skipped with the reason
  eval       eval.json                                     perplexity: PyTorch, ONNX Runtime per graph, TensorRT per
                                                           engine; per-Linear SQNR (naive vs sq) on a calibration batch
  report     report.md, report.json, plots/*.png           sq_export.report (rendering only)

With --stream (sq_export.run.streamed) calibrate, smooth, export and eval read the checkpoint a layer or a tensor
at a time instead, for fp and sq only.

Each stage declares its inputs (paths) and options: the recipe options it depends on are among them, so changing
one reruns exactly the stages it affects and those downstream.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sq_export.errors import BadInput, GraphCheckFailed
from sq_export.fileio import write_text_atomic
from sq_export.run import streamed
from sq_export.run.context import RunContext
from sq_export.run.driver import Skip, StageFailed
from sq_export.run.options import (ACT_SCALES, BUILD, CALIB_ROWS, CHANNEL_STATS, CHECK, EVAL, PREFIX, SMOOTHED, STAGES,
                                   engine_name, engine_segments_name, onnx_name, segments_name)

ENGINE_PPL_TOLERANCE = 0.05  # an engine more than 5 % above its own graph's perplexity computes something else


@dataclass(frozen=True)
class Stage:
    name: str
    spec: Callable  # (ctx) -> (inputs {key: path}, options)
    run: Callable  # (ctx, staging) -> summary


# ----- what stages record ---------------------------------------------------------------------------------------
def recipe_options(ctx: RunContext, *keys) -> dict:
    """The delivered recipe's options a stage records (so changing one reruns it): alpha, smooth_pairs, clip,
    fallback (+ the --fallback auto budget and criterion only when they apply), runtime (attention, LM head)."""
    r = ctx.recipe("sq")
    d = {"recipe": ctx.opts.recipe}
    if "alpha" in keys:
        d["alpha"] = r.alpha
        d["weight_granularity"] = "channel" if r.per_channel else "tensor"
    if "smooth_pairs" in keys:
        d["smooth_pairs"] = r.linear_pairs
    if "clip" in keys:
        d["clip"] = r.clip or "max"
    if "fallback" in keys:
        d["fallback"] = r.fallback or None
        if r.fallback == "auto":
            from sq_export.quant.fallback import FALLBACK_CRITERION

            d.update({"target_ppl_increase": r.target_ppl_increase, "max_fallback": r.max_fallback,
                      "fallback_windows_seq_len": r.calib.seq_len, "fallback_criterion": FALLBACK_CRITERION})
    if "runtime" in keys:
        d.update({"quantize_attention": r.quantize_attention, "quantize_lm_head": r.quantize_lm_head, "modes": list(ctx.modes)})
        if r.rotate_down:  # (absent when off: the records of earlier runs keep matching)
            d["rotate_down"] = r.rotate_down
    return d


def torch_side(ctx: RunContext) -> dict:
    """The PyTorch side's device and model type when not the CPU in float32 (then nothing: records of runs before
    --device keep matching): a calibration on a GPU in bfloat16 gives other act maxima, so it reruns the stages."""
    import torch

    from sq_export.device import checkpoint_dtype, dtype_name, resolve_device, resolve_dtype

    dev = resolve_device(ctx.opts.device)
    dt = resolve_dtype(ctx.opts.model_dtype, dev, checkpoint_dtype(ctx.model_path))
    if dev.type == "cpu" and dt == torch.float32:
        return {}
    return {"device": dev.type, "model_dtype": dtype_name(dt)}


def rows_input(ctx: RunContext) -> dict:
    return {"calib_rows": ctx.out / CALIB_ROWS} if ctx.needs_rows() else {}


def prefix_input(ctx: RunContext) -> dict:
    """The outlier prefix the quantized models and their graphs run after (--prefix-outliers)."""
    return {"prefix": ctx.out / PREFIX} if ctx.opts.prefix_outliers else {}


def graph_inputs(ctx: RunContext, modes=None) -> dict:
    return {m: ctx.out / onnx_name(m) for m in (modes or ctx.modes)}


def quantized_modes(ctx: RunContext) -> list[str]:
    return [m for m in ctx.modes if m != "fp"]


# ----- calibrate ------------------------------------------------------------------------------------------------
def spec_calibrate(ctx: RunContext):
    if ctx.opts.stream:
        return streamed.spec_calibrate(ctx, torch_side(ctx))
    c = ctx.opts.calib
    calib = {"samples": c.samples, "calib_seq_len": c.seq_len, "calib_batch": c.batch_size}
    # the row sample only when a recipe option needs it ("row_sample" absent otherwise, so runs without those
    # options keep their records); the act max of a pass is the same with or without it
    rows = {"row_sample": ctx.opts.reservoir_rows} if ctx.needs_rows() else {}
    if ctx.opts.act_scales:
        inputs = {"model": ctx.model_path, "act_scales": Path(ctx.opts.act_scales)}
        if rows:  # the maxima come from the file; the row sample still needs a pass over the calibration text
            inputs["calib_text"] = ctx.calib_text()
            return inputs, {"act_scales": "given", **calib, **rows}
        return inputs, {"act_scales": "given"}
    prefix = {"prefix_outliers": ctx.opts.prefix_outliers} if ctx.opts.prefix_outliers else {}
    options = {**calib, **rows, **prefix, **torch_side(ctx)}
    prev = (ctx.manifest["stages"].get("calibrate") or {}).get("options") or {}
    if not rows and prev.get("row_sample") and {k: v for k, v in prev.items() if k != "row_sample"} == options:
        options = prev  # the calibration that also sampled rows serves a recipe that needs none: no recalibration
    return {"model": ctx.model_path, "calib_text": ctx.calib_text()}, options


def run_calibrate(ctx: RunContext, staging: Path) -> dict:
    if ctx.opts.stream:
        return streamed.run_calibrate(ctx, staging)
    from sq_export.quant.calibrate import calibrate_ids, save_act_scales
    from sq_export.quant.reservoir import save_rows
    from sq_export.textdata import token_ids

    from sq_export.quant.prefix import save_prefix

    model, tok, fam = ctx.loaded()
    o = ctx.opts
    calib = calibrate_ids(model, fam, token_ids(tok, o.calib.calib_text, "calib"), o.calib,
                          rows=o.reservoir_rows if ctx.needs_rows() else None, act_scales=o.act_scales,
                          prefix=ctx.recipe("sq").prefix_spec(), tokenizer=tok)
    if calib.prefix is not None:  # the later stages run every quantized model after exactly this prefix
        save_prefix(staging / PREFIX, calib.prefix)
    elif (ctx.out / PREFIX).exists():
        (ctx.out / PREFIX).unlink()
    meta = dict(calib.meta)
    meta.pop("seconds", None)  # no times in artifacts
    res = calib.reservoir
    save_act_scales(staging / ACT_SCALES, calib.act_max, {"model_type": model.config.model_type, **meta})
    summary = {"linears": len(calib.act_max), **meta}
    if calib.prefix is not None:
        summary["prefix_outliers"] = calib.prefix.summary()
    if res is not None:
        save_rows(staging / CALIB_ROWS, res)
        summary["row_sample"] = {"rows": res.rows, "inputs": len(res.data), "bytes": res.nbytes()}
    elif (ctx.out / CALIB_ROWS).exists():
        (ctx.out / CALIB_ROWS).unlink()  # a stale sample of an earlier calibration must not be read
    ctx.forget_calibration()  # later stages use exactly what was written
    return summary


# ----- smooth ---------------------------------------------------------------------------------------------------
def spec_smooth(ctx: RunContext):
    if ctx.opts.stream:
        return streamed.spec_smooth(ctx, recipe_options(ctx, "alpha", "smooth_pairs", "clip", "fallback"), torch_side(ctx))
    inputs = {"model": ctx.model_path, "act_scales": ctx.out / ACT_SCALES, "calib_text": ctx.calib_text()}
    options = {"check_seq_len": min(128, ctx.opts.calib.seq_len), **recipe_options(ctx, "alpha", "smooth_pairs"), **torch_side(ctx)}
    if ctx.recipe("sq").alpha == "auto":  # the search reads the row sample
        inputs.update(rows_input(ctx))
    return inputs, options


def run_smooth(ctx: RunContext, staging: Path) -> dict:
    if ctx.opts.stream:
        return streamed.run_smooth(ctx, staging)
    import torch
    from safetensors.torch import save_file

    from sq_export.modeling import abs_max, weight_oi
    from sq_export.quant.prepare import working_copy
    from sq_export.run.channel_stats import save_channel_stats
    from sq_export.quant.smooth import smooth_checked, smoothed_act_max

    model, tok, fam = ctx.loaded()
    r = ctx.recipe("sq")
    pairs = r.linear_pairs
    alpha = ctx.alpha()
    calib = ctx.calibration()
    act = calib.act_max
    alpha_groups = None
    t_search = None
    if alpha == "auto":
        from sq_export.quant.alpha import search_alpha

        t = time.perf_counter()
        alpha_groups = search_alpha(model, fam, act, calib.reservoir, pairs, per_channel=r.per_channel)
        t_search = round(time.perf_counter() - t, 2)
    m = working_copy(model, fam, smoothing=True, linear_pairs=pairs)  # shares what smoothing does not change
    # the same check as `smooth`/`eval`/`export`: the smoothed float model (pairs folded too) must give the
    # original logits, or nothing is written (exit 4)
    factors, delta = smooth_checked(m, fam, act, alpha_groups or alpha, calib.check_batch(), linear_pairs=pairs)
    dest = staging / SMOOTHED
    dest.mkdir()
    m.config.sq_export = {"smoothed": True, "alpha": alpha, "family": fam.name}
    if pairs:
        m.config.sq_export["smooth_pairs"] = True
    if alpha_groups is not None:
        m.config.sq_export["alpha_per_group"] = alpha_groups
    m.save_pretrained(dest, safe_serialization=True)
    del m.config.sq_export
    tok.save_pretrained(dest)
    save_file({k: v.contiguous() for k, v in sorted(factors.items())}, str(dest / "smoothing_factors.safetensors"))

    # per-channel statistics of every quantized Linear, before and after, for the report
    names = fam.quantized_linears()
    with torch.no_grad():
        w_before = {n: abs_max(weight_oi(model.get_submodule(n)), 0) for n in names}
        w_after = {n: abs_max(weight_oi(m.get_submodule(n)), 0) for n in names}
    default_linear = save_channel_stats(staging / CHANNEL_STATS, fam, model.config.model_type, act,
                                        smoothed_act_max(act, fam, factors, pairs), w_before, w_after, alpha=alpha,
                                        pairs=pairs, alpha_groups=alpha_groups)
    ctx._alpha_groups = alpha_groups
    ctx.release("sq")
    ctx._prepared.pop("sq", None)
    summary = {"alpha": alpha, "smooth_pairs": pairs, "groups": len(factors), "max_abs_logit_change": delta,
               "default_report_linear": default_linear}
    if alpha_groups is not None:
        summary["alpha_per_group"] = alpha_groups
        summary["alpha_search_s"] = t_search
    return summary


# ----- export ---------------------------------------------------------------------------------------------------
def spec_export(ctx: RunContext):
    inputs = {"model": ctx.model_path, "act_scales": ctx.out / ACT_SCALES, "smoothed": ctx.out / SMOOTHED, **rows_input(ctx),
              **prefix_input(ctx)}
    if ctx.recipe("sq").fallback == "auto":  # scored on calibration-split windows
        inputs["calib_text"] = ctx.calib_text()
    o = ctx.opts
    return inputs, {"weights": o.weights, "act": "static", "target": o.target, "dtype": o.dtype,
                    **recipe_options(ctx, "alpha", "smooth_pairs", "clip", "fallback", "runtime"), **torch_side(ctx),
                    **(streamed.STREAM if o.stream else {}), **({"segments": o.segments} if o.segments else {})}


def split_graph(ctx: RunContext, staging: Path, mode: str, summary: dict) -> None:
    """--segments N: cut the graph just written into staging into N segments beside it (sq_export.onnxio.segments:
    the segment files point into the graph's own bytes, so they sit and move with it)."""
    if not ctx.opts.segments:
        return
    from sq_export.onnxio.segments import split

    man = split(staging / onnx_name(mode), segments=ctx.opts.segments, out=staging / segments_name(mode))
    summary["segments"] = [e["layers"] for e in man["segments"]]


def run_export(ctx: RunContext, staging: Path) -> dict:
    if ctx.opts.stream:
        return streamed.run_export(ctx, staging)
    from sq_export.export.exporter import export_onnx
    from sq_export.onnxio.meta import graph_metadata

    _, _, fam = ctx.loaded()
    o = ctx.opts
    calibration = Path(o.act_scales).name if o.act_scales else o.calib.label()
    summary = {}
    for mode in ctx.modes:
        m = ctx.quantized(mode)
        prep = ctx.prepared(mode)
        meta = graph_metadata(ctx.model_arg, prep, calibration, family=fam)
        res = export_onnx(m, fam, staging / onnx_name(mode), weights=o.weights, target=o.target, meta=meta,
                          **({"dtype": o.dtype} if o.dtype != "fp32" else {}))
        del m
        ctx.release(mode)  # one quantized model at a time (eval rebuilds it, replaying the searches)
        summary[mode] = {"bytes": res["bytes"], "nodes": res["nodes"], "quantized_linears": len(prep.quantized)}
        split_graph(ctx, staging, mode, summary[mode])
        if mode == "sq":
            summary[mode]["fp16_layers"] = list(prep.fp16_layers)
            if prep.tune.get("fallback"):
                summary[mode]["fallback"] = prep.tune["fallback"]
            if prep.tune.get("clip_ratio"):
                summary[mode]["clip_ratio_min"] = min(prep.tune["clip_ratio"].values())
    return summary


# ----- check ----------------------------------------------------------------------------------------------------
def spec_check(ctx: RunContext):
    modes = quantized_modes(ctx)
    return graph_inputs(ctx, modes), {"target": ctx.opts.target, "graphs": modes}


def run_check(ctx: RunContext, staging: Path) -> dict:
    from sq_export.passes.check import run_check as check_graph

    reports = {}
    for m in quantized_modes(ctx):
        r = check_graph(ctx.out / onnx_name(m), target=ctx.opts.target)
        d = r.to_json()
        d["source"] = onnx_name(m)
        reports[onnx_name(m)] = d
    ok = all(d["ok"] for d in reports.values())
    doc = {"ok": ok, "graphs": reports}
    (staging / CHECK).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    summary = {"ok": ok, "violations": {k: len(d["violations"]) for k, d in reports.items()}}
    if not ok:
        bad = [f"{k}: {v['rule']} {v['node']}" for k, d in reports.items() for v in d["violations"]][:3]
        n = sum(summary["violations"].values())
        raise StageFailed(summary, GraphCheckFailed(f"check found {n} violation(s) ({'; '.join(bad)}); see {ctx.out / CHECK}"))
    return summary


# ----- build ----------------------------------------------------------------------------------------------------
def tensorrt_or_skip(ctx: RunContext):
    """(TensorRT version, GPU facts) where the engines are built and run: this process, or --trt-python's
    interpreter (sq_export.engine.external); Skip with the reason when there is none."""
    import re

    from sq_export.engine import external
    from sq_export.engine.trt_compat import import_tensorrt, require_gpu
    from sq_export.errors import BackendMissing

    if ctx.opts.target != "tensorrt":
        raise Skip(f"--target {ctx.opts.target}: the graphs are for ONNX Runtime, not TensorRT")
    if ctx.opts.trt_python:
        try:
            version, gpu = external.probe(ctx.opts.trt_python)
        except BackendMissing as e:
            raise Skip(f"no TensorRT with a GPU under --trt-python ({str(e)[:300]})") from None
    else:
        try:
            version = import_tensorrt().__version__
        except BackendMissing as e:
            m = re.search(r"\((.*?)\)", str(e))
            raise Skip(f"TensorRT not installed ({m.group(1) if m else str(e)[:200]}); or give --trt-python PATH, a "
                       "Python that has it") from None
        try:
            gpu = require_gpu()
        except BackendMissing as e:
            raise Skip(f"no usable GPU for TensorRT {version} ({str(e)[:200]})") from None
    if ctx.opts.dtype == "fp16" and int(version.split(".")[0]) < 10:
        raise Skip(f"--dtype fp16 graphs need TensorRT 10+ (strongly typed); this is {version}")
    return version, gpu


def build_profile(ctx: RunContext):
    L = ctx.opts.seq_len
    return {"batch": [1, 1, 4], "seq": [1, min(128, L), max(L, 2)]}


def spec_build(ctx: RunContext):
    version, gpu = tensorrt_or_skip(ctx)
    o = ctx.opts
    inputs = graph_inputs(ctx)
    seg = {}
    if o.segments:
        inputs.update({f"segments_{m}": ctx.out / segments_name(m) for m in ctx.modes})
        seg = {"segments": o.segments, "build_jobs": o.build_jobs}
    return inputs, {"tensorrt": version, "gpu": gpu.get("name"), **build_profile(ctx), **seg}


def _build_segments(ctx: RunContext, staging: Path, mode: str, precision: str, prof: dict) -> dict:
    """--segments: one engine per segment of model.{mode}.segments.json (sq_export.engine.chain.build_segments:
    each in its own process, --build-jobs at once), the engine manifest and engines written into staging."""
    from sq_export.engine.chain import build_segments

    args = ["--precision", precision, "--batch", ":".join(map(str, prof["batch"])), "--seq", ":".join(map(str, prof["seq"]))]
    man = build_segments(ctx.out / segments_name(mode), staging / engine_segments_name(mode), jobs=ctx.opts.build_jobs,
                         build_args=args, python=ctx.opts.trt_python)
    return {"built": True, "engine": engine_segments_name(mode), "bytes": man["engine_bytes"], "build_seconds": man["wall_seconds"],
            "precision": precision, "segments": len(man["segments"])}


def run_build(ctx: RunContext, staging: Path) -> dict:
    from sq_export.engine import external

    prof = build_profile(ctx)
    out = {}
    for mode in ctx.modes:
        precision = "fp16" if mode == "fp" else "int8"
        dest = staging / engine_name(mode)
        try:
            if ctx.opts.segments:
                out[mode] = _build_segments(ctx, staging, mode, precision, prof)
                continue
            side = external.build(ctx.out / onnx_name(mode), dest, precision=precision, batch=prof["batch"], seq=prof["seq"],
                                  python=ctx.opts.trt_python)
        except BadInput as e:
            if mode != "fp":
                raise
            out[mode] = {"built": False, "reason": str(e)}  # e.g. TensorRT 10+: an FP32 graph gives no FP16 engine
            continue
        side["engine"] = engine_name(mode)
        side["onnx"] = onnx_name(mode)
        write_text_atomic(str(dest) + ".json", json.dumps(side, indent=2) + "\n")
        out[mode] = {"built": True, "engine": engine_name(mode), "bytes": side["engine_bytes"], "build_seconds": side["build_seconds"],
                     "precision": precision, "tensorrt_version": side["tensorrt_version"]}
    (staging / BUILD).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out


def engines(ctx: RunContext) -> dict:
    """{mode: engine path} of engines the build stage produced (and that are up to date)."""
    produced = set(ctx.stage_outputs("build"))
    name = engine_segments_name if ctx.opts.segments else engine_name  # --segments: the engine manifest (a chain)
    return {m: ctx.out / name(m) for m in ctx.modes if name(m) in produced}


# ----- eval -----------------------------------------------------------------------------------------------------
def spec_eval(ctx: RunContext):
    if ctx.opts.stream:
        return streamed.spec_eval(ctx, graph_inputs(ctx), engines(ctx), recipe_options(ctx, "alpha", "smooth_pairs", "clip", "fallback"),
                                  torch_side(ctx))
    inputs = {"model": ctx.model_path, "act_scales": ctx.out / ACT_SCALES, "smoothed": ctx.out / SMOOTHED,
              "eval_text": ctx.eval_text(), "calib_text": ctx.calib_text(), **rows_input(ctx), **prefix_input(ctx)}
    inputs.update({f"onnx_{m}": p for m, p in graph_inputs(ctx).items()})
    inputs.update({f"engine_{m}": p for m, p in engines(ctx).items()})
    return inputs, {
        "max_tokens": ctx.opts.max_tokens,
        "seq_len": ctx.opts.seq_len,
        "sqnr_batch": [2, min(128, ctx.opts.calib.seq_len)],
        **recipe_options(ctx, "alpha", "smooth_pairs", "clip", "fallback", "runtime"),
        **torch_side(ctx),
    }


def run_eval(ctx: RunContext, staging: Path) -> dict:
    if ctx.opts.stream:
        return streamed.run_eval(ctx, staging, engines(ctx))
    import contextlib

    import numpy as np

    from sq_export.quant import prefix as prefix_mod

    from sq_export.measure.perplexity import onnx_perplexity, torch_perplexity
    from sq_export.measure.sqnr import linear_outputs, smoothed_reference, sqnr_against, sqnr_in_parts
    from sq_export.textdata import token_ids

    model, tok, fam = ctx.loaded()
    o = ctx.opts
    ids = np.array(token_ids(tok, o.eval_text, "eval"))  # a writable copy for torch.as_tensor
    ppl: dict = {"pytorch": {}, "onnxruntime": {}}
    secs: dict = {"pytorch": {}, "onnxruntime": {}}
    tokens = None
    # PyTorch: the float model, then one quantized model at a time (built, measured, released); the per-Linear
    # SQNR of each against the float model it approximates (naive: the float model; SQ: with --smooth-pairs the
    # smoothed float model, report.smoothed_reference). The float model's reference outputs (~160 MB for
    # SmolLM2) are taken after the perplexity pass, a third of the Linears at a time (report.sqnr_in_parts: the
    # float model is resident anyway, so recomputing them per mode is a few small forwards); the smoothed
    # reference of --smooth-pairs is taken whole before the SQ model is built, so that its model copy and the
    # SQ model never coexist
    names = fam.quantized_linears()
    batch = ctx.calibration().check_batch()
    main = ctx.recipe("sq")
    # with --prefix-outliers every quantized model runs after the prefix, and so does the float reference of the
    # SQNR; the float model with the prefix is also measured ("fp_prefix": what the quantized models approximate)
    pre = ctx.prefix()
    after_prefix = (lambda mm: prefix_mod.applied(mm, pre)) if pre is not None else (lambda mm: contextlib.nullcontext())
    t_sqnr = 0.0
    sqnr = {n: {} for n in names}
    for mode in ctx.modes:
        ref = None
        if mode == "sq" and main.linear_pairs:
            t = time.perf_counter()
            smoothed = smoothed_reference(model, fam, ctx.act_max(), ctx.smooth_alpha(), True)
            with after_prefix(smoothed):
                ref = linear_outputs(smoothed, names, batch)
            del smoothed
            t_sqnr += time.perf_counter() - t
        t = time.perf_counter()
        m = ctx.quantized(mode)
        r = torch_perplexity(m, ids, o.seq_len, o.max_tokens, desc=f"eval pytorch {mode}")
        ppl["pytorch"][mode], tokens = r["perplexity"], r["tokens"]
        secs["pytorch"][mode] = round(time.perf_counter() - t, 2)
        if mode == "fp" and pre is not None:
            t = time.perf_counter()
            with after_prefix(model):
                ppl["pytorch"]["fp_prefix"] = torch_perplexity(model, ids, o.seq_len, o.max_tokens, desc="eval pytorch fp + prefix")["perplexity"]
            secs["pytorch"]["fp_prefix"] = round(time.perf_counter() - t, 2)
        if mode in ("naive", "sq"):  # the report's SQNR chart: naive W8A8 vs the delivered recipe
            t = time.perf_counter()
            if ref is None:  # the float model's outputs, a third at a time (the SQ model is resident too)
                with after_prefix(model):
                    got = sqnr_in_parts(model, m, names, batch)
            else:
                got = sqnr_against(ref, m, names, batch)
            for n, v in got.items():
                sqnr[n][mode] = v
            del got
            del m, ref
            ctx.release(mode)
            t_sqnr += time.perf_counter() - t
        else:
            del m
            ctx.release(mode)  # (fp: the float model stays) the forward passes' freed activations, back to the OS
    prep = ctx.prepared("sq")
    alpha = ctx.alpha()
    del model, fam  # (the family holds the model too)
    ctx.release(model=True)  # ONNX Runtime and TensorRT below need no torch model
    for mode in ctx.modes:
        t = time.perf_counter()
        r = onnx_perplexity(str(ctx.out / onnx_name(mode)), ids, o.seq_len, o.max_tokens)
        ctx.release()  # ONNX Runtime frees a session's memory into the heap, where it stayed resident (+750 MB)
        ppl["onnxruntime"][mode] = r["perplexity"]
        secs["onnxruntime"][mode] = round(time.perf_counter() - t, 2)
    built = engines(ctx)
    if built:
        from sq_export.engine import external
        from sq_export.engine.run import Tokens
        from sq_export.measure.perplexity import chunk_tokens

        toks = Tokens.from_chunks(chunk_tokens(ids, o.seq_len, o.max_tokens), "<eval text>")
        ppl["tensorrt"], secs["tensorrt"] = external.engines_perplexity(built, toks, python=o.trt_python)
    engine_check = engine_agreement(ppl.get("tensorrt", {}), ppl["onnxruntime"])
    sqnr = [{"linear": n, **v} for n, v in sqnr.items()]  # a list: model order survives sort_keys
    secs["sqnr"] = round(t_sqnr, 2)
    recipe = {
        "name": o.recipe,
        "describe": main.describe(),
        "alpha": alpha,
        "alpha_per_group": prep.alpha_per_group,
        "smooth_pairs": main.linear_pairs,
        "clip": main.clip or "max",
        "fallback": main.fallback or None,
        "quantized_layers_total": len(prep.quantized),
        "fp16_layers": list(prep.fp16_layers),
        **({"prefix_outliers": pre.summary()} if pre is not None else {}),
    }
    write_eval(ctx, staging, recipe, tokens, ppl, engine_check, layer_sqnr_db=sqnr, sqnr_batch=list(batch.shape))
    return {"tokens": tokens, "perplexity": ppl, "seconds": secs, "fp16_layers": recipe["fp16_layers"],
            "engine_vs_graph": engine_check}


def write_eval(ctx: RunContext, staging: Path, recipe: dict, tokens, ppl: dict, engine_check: dict, **extra) -> None:
    """eval.json: the recipe delivered, the tokens and chunking, perplexity per backend and model, each engine's
    agreement with its reference, and what the caller adds (per-Linear SQNR; a streamed run's skipped parts)."""
    o = ctx.opts
    doc = {
        "recipe": recipe,
        "tokens": tokens,
        "seq_len": o.seq_len,
        "max_tokens": o.max_tokens,
        "eval_text": ctx.eval_text().name,
        "modes": list(ctx.modes),
        "recipes": {m: ctx.recipe(m).describe() for m in ctx.modes},
        "perplexity": ppl,
        "engine_vs_graph": engine_check,
        **extra,
    }
    (staging / EVAL).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def engine_agreement(engine_ppl: dict, graph_ppl: dict, tol: float = ENGINE_PPL_TOLERANCE, reference: str = "onnxruntime") -> dict:
    """{mode: {engine, <reference>, reference, ratio, ok}}: each TensorRT engine's perplexity against its graph's on
    the same tokens — ONNX Runtime on the graph it was built from, or (run --stream) the layer-streamed PyTorch model
    the graph was exported from. FP16 and INT8 engines land within 0.1 % of their graphs when they compute the
    graph's function; an FP16 overflow inside an engine shows up as a ratio of 100-1000x."""
    import math

    out = {}
    for mode, e in engine_ppl.items():
        g = graph_ppl.get(mode)
        if g is None:
            continue
        ratio = e / g if g and math.isfinite(e) else float("inf")
        out[mode] = {"engine": e, reference: g, "reference": reference, "ratio": ratio, "ok": bool(ratio <= 1 + tol)}
    return out


# ----- report ---------------------------------------------------------------------------------------------------
def prior_records_digest(ctx: RunContext) -> str:
    """What the report shows of the earlier stages' records (not this run's ran/skipped status)."""
    keep = {}
    for n in STAGES[:-1]:
        r = ctx.manifest["stages"].get(n)
        if r:
            keep[n] = {k: r.get(k) for k in ("inputs", "options", "outputs", "wall_s", "summary")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def spec_report(ctx: RunContext):
    inputs = {"act_scales": ctx.out / ACT_SCALES, "channel_stats": ctx.out / CHANNEL_STATS, "eval": ctx.out / EVAL,
              "check": ctx.out / CHECK}
    if BUILD in ctx.stage_outputs("build"):
        inputs["build"] = ctx.out / BUILD
    return inputs, {"linear": ctx.opts.report_linear, "stages_digest": prior_records_digest(ctx)}


def run_report(ctx: RunContext, staging: Path) -> dict:
    from sq_export.report import write_report

    return write_report(ctx.out, ctx.manifest, staging, linear=ctx.opts.report_linear)


PIPELINE = [Stage(n, globals()[f"spec_{n}"], globals()[f"run_{n}"]) for n in STAGES]
