"""sq-export run MODEL -o OUT: calibrate → smooth → export → check → build → eval → report, resumable."""

from sq_export.commands import _common as c

HELP = "the whole pipeline into one folder: calibrate, smooth, export (fp/naive/sq), check, build, eval, report"

STAGES = ("calibrate", "smooth", "export", "check", "build", "eval", "report")

EXAMPLES = """examples:
  sq-export run smollm2 -o out/                          # everything; OUT/report.md at the end
  sq-export run smollm2 -o out/                          # again: every stage up to date, skipped
  sq-export run smollm2 -o out/ --recipe paper           # deliver the paper's recipe (norm folds, fixed alpha)
  sq-export run smollm2 -o out/ --fallback none          # every Linear INT8
  sq-export run smollm2 -o out/ --until export           # stop after the ONNX files
  sq-export run smollm2 -o out/ --weights qdq            # graphs for TensorRT 8.6
  sq-export run smollm2 -o out/ --force --samples 64 --calib-seq-len 256 --max-tokens 2048
  sq-export run llama-2-7b/ -o out7b/ --stream --device cuda --weights qdq16   # a model larger than memory, layer by layer

The recipe and graph options are those of `export`: model.sq.onnx is the delivered model (the default recipe unless
--recipe or an option says otherwise); model.paper.onnx (the paper's setup) and model.naive.onnx (plain W8A8) are
built beside it with the same calibration, and model.fp.onnx is the float reference. Changing an option reruns the
stages it affects (e.g. --smooth-pairs: smooth and later; --fallback or --clip: export and later).

OUT holds act_scales.safetensors (+ calib_rows.safetensors), smoothed/, model.{fp,naive,paper,sq}.onnx, check.json, model.*.engine (TensorRT only),
eval.json, report.md, report.json, plots/*.png and manifest.json (per stage: inputs/outputs with sha256, options,
tool versions, wall time). A stage is skipped when its inputs, options and outputs are unchanged; Ctrl-C leaves no
partial file at a final path, and the next run resumes with the interrupted stage.

--stream (MODEL: a Hugging Face folder of safetensors) never loads the model whole: calibration, smoothing and
quantization run one decoder layer at a time into smoothed/ (+ sq_quant.json), and model.fp.onnx and model.sq.onnx are
written from placeholders, each weight read from the checkpoint when written. It builds fp and sq only (naive and
paper would each need a streamed quantization of their own); --fallback defaults to none (auto needs whole-model
logits; N or NAMES stream); eval measures the TensorRT engines only (PyTorch and ONNX Runtime perplexity and the
per-Linear SQNR need whole models: eval.json and the report say so). Refused with --stream: --fallback auto,
--quantize-attention, --quantize-lm-head, --act-scales, --prefix-outliers, --dtype fp16.
exit codes: 0 ok, 1 check found violations or an engine does not match its graph, 2 bad input, 3 backend missing, 4 refused (smoothing changed outputs)"""


def add_parser(sub):
    import argparse

    p = sub.add_parser("run", help=HELP, description=HELP + ".", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_model(p)
    c.add_device(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for every artifact (created if missing; resumed if it holds a run)")
    p.add_argument("--force", action="store_true", help="redo every stage even when up to date")
    p.add_argument("--until", choices=STAGES, metavar="STAGE", help=f"stop after STAGE ({', '.join(STAGES)})")
    p.add_argument("--text", metavar="FILE", help="evaluation text (default: the shipped held-out split)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="evaluate the first N tokens (default 4096; 0 = all)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L", help="evaluation chunk length (default 512)")
    p.add_argument("--report-linear", metavar="NAME", help="Linear whose input channels the report plots (default: the middle layer's q_proj-equivalent)")
    c.add_recipe(p, modes=False)
    c.add_export_options(p)
    p.add_argument("--stream", action="store_true", help="for models larger than memory (MODEL: a folder of safetensors): "
                   "calibrate, smooth, quantize one decoder layer at a time and write the graphs from placeholders; builds "
                   "fp and sq only (no naive, no paper), --fallback none unless given (auto refused), eval measures the "
                   "TensorRT engines only (no PyTorch / ONNX Runtime perplexity, no per-Linear SQNR)")
    p.add_argument("--segments", type=int, metavar="N", help="cut each graph into N segments of consecutive decoder layers "
                   "(`sq-export split`) and build one TensorRT engine per segment, run as one chain (TensorRT 8.6's builder "
                   "needs ~10x a graph's weights in host memory: a 7B graph does not build whole on a 128 GB host)")
    p.add_argument("--build-jobs", type=int, default=1, metavar="J", help="with --segments: build J segment engines at once (default 1)")
    p.add_argument("--trt-python", metavar="PATH", help="build and measure the TensorRT engines by running PATH -m sq_export "
                   "(a Python that has TensorRT when this one does not: another environment or container; it needs numpy, "
                   "onnx, Polygraphy and TensorRT, no torch)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    p.set_defaults(func=run)
    return p


def run(args):
    import sys
    from pathlib import Path

    from sq_export import progress
    from sq_export.api import normalize_target
    from sq_export.quant.recipe import parse_percent
    from sq_export.quant.recipe import CalibOptions
    from sq_export.run import RunOptions, run_pipeline
    from sq_export.quant.recipe import parse_prefix

    tpi = args.target_ppl_increase
    opts = RunOptions(
        recipe=args.recipe or "default",
        alpha=args.alpha,
        act_scales=args.act_scales,
        per_channel=args.weight_granularity == "channel",
        linear_pairs=args.smooth_pairs,
        clip=args.clip,
        fallback=args.fallback,
        target_ppl_increase=None if tpi is None else parse_percent(tpi, "--target-ppl-increase"),
        max_fallback=args.max_fallback,
        quantize_attention=args.quantize_attention,
        quantize_lm_head=args.quantize_lm_head,
        prefix_outliers=args.prefix_outliers if parse_prefix(args.prefix_outliers) is not None else None,
        rotate_down=args.rotate_down,
        calib=CalibOptions(args.calib_text, args.samples, args.calib_seq_len, args.calib_batch),
        weights=args.weights,
        target=normalize_target(args.target),
        dtype=args.dtype,
        segments=args.segments,
        build_jobs=args.build_jobs,
        trt_python=args.trt_python,
        device=args.device,
        model_dtype=args.model_dtype,
        eval_text=args.text,
        max_tokens=args.max_tokens or None,
        seq_len=args.seq_len,
        report_linear=args.report_linear,
        stream=args.stream,
        force=args.force,
        until=args.until,
    )

    def echo(msg):
        if not progress.QUIET:
            from tqdm.auto import tqdm

            tqdm.write(f"run: {msg}", file=sys.stderr)  # above the progress bar, not through it

    m = run_pipeline(args.model, args.output, opts, echo=echo)
    last = m["last_run"]
    ev = (m["stages"].get("eval") or {}).get("summary", {}).get("perplexity", {}).get("pytorch", {})
    summary = {"output": args.output, "status": last["status"], "ran": last["ran"], "skipped": last["skipped"], "perplexity_pytorch": ev}
    if args.json:
        c.emit_json(summary)
    else:
        out = Path(args.output)
        print(f"{last['status']}: ran {', '.join(last['ran']) or 'nothing'}; up to date/skipped {', '.join(last['skipped']) or 'nothing'}")
        if ev and "report" in m["stages"] and last["until"] in ("eval", "report"):
            print("perplexity (PyTorch): " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        trt = (m["stages"].get("eval") or {}).get("summary", {}).get("perplexity", {}).get("tensorrt", {})
        if opts.stream and trt and last["until"] in ("eval", "report"):
            print("perplexity (TensorRT): " + ", ".join(f"{k} {v:.3f}" for k, v in trt.items() if v is not None))
        if (out / "report.md").is_file() and last["until"] == "report":
            print(f"report: {out / 'report.md'}")
    bad = {k: v for k, v in (m["stages"].get("eval") or {}).get("summary", {}).get("engine_vs_graph", {}).items() if not v["ok"]}
    if bad:
        from sq_export.report import REFERENCE_LABELS

        k, v = next(iter(bad.items()))
        ref = v.get("reference", "onnxruntime")
        print(f"sq-export run: error: the TensorRT engine of model.{k}.onnx does not compute its graph (perplexity "
              f"{v['engine']:.4g} vs {v[ref]:.4g} {REFERENCE_LABELS.get(ref, ref)}): do not deploy it; rebuild it with "
              f"`sq-export build {Path(args.output) / ('model.' + k + '.onnx')} -o {Path(args.output) / ('model.' + k + '.engine')} --no-fp16` (docs/TENSORRT.md)", file=sys.stderr)
        return 1
    return 0
