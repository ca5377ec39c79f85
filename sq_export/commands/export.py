"""sq-export export MODEL -o model.onnx: calibrate, smooth, quantize and export one Q/DQ ONNX graph."""

from sq_export.commands import _common as c

HELP = "export an ONNX graph: W8A8 Q/DQ (naive or SmoothQuant) or plain float"


def add_parser(sub):
    p = sub.add_parser(
        "export",
        help=HELP,
        description=HELP
        + ".\nExamples:\n  sq-export export smollm2 -o out/sq.onnx                 # TensorRT 10+ (int8 weights)\n"
        "  sq-export export smollm2 --weights qdq -o out/sq86.onnx # TensorRT 8.6 (float W -> Q -> DQ)\n"
        "  sq-export export smollm2 --mode fp -o out/fp.onnx\n"
        "  sq-export export FOLDER --mode fp --weights qdq16 --stream -o out/fp16w.onnx  # float16-exact weights stored in float16, written from FOLDER without loading it\n"
        "  sq-export export smollm2 --dtype fp16 -o out/sq16.onnx   # float16 float parts, opset 19 (TensorRT 10+ strongly typed)",
    )
    c.add_model(p, " (or a smoothed folder from `smooth`, with --act-scales of the smoothed model)")
    c.add_device(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    c.add_tokenizer(p)
    c.add_recipe(p)
    c.add_export_options(p)
    p.add_argument("--stream", metavar="DIR", nargs="?", const="", default=None, help="calibrate, smooth and quantize one decoder layer at a time from MODEL's safetensors into DIR (the smoothed checkpoint and its scales: sq_quant.json), then export from DIR without loading it (each weight read when written); for models larger than the GPU; --fallback auto needs the whole model (use none, N or names). With --mode fp: no DIR (nothing to quantize): the float graph is written from MODEL's safetensors without loading them")
    p.add_argument("--trace-device", choices=["cpu", "cuda"], default="cpu", help="where the float32 trace of the logits graph runs: cpu (default) or cuda (the 4 bytes a parameter in GPU memory instead of host memory: for 7B+ models on a GPU host; with --stream the quantized folder is loaded onto the GPU)")
    p.add_argument("--decode", action="store_true", help="KV-cache decode graph: inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value; outputs logits, present.{i}.key/value (float cache)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args):
    import sys
    import time

    from sq_export import api
    from sq_export.errors import BadInput
    from sq_export.fileio import check_output_path
    from sq_export.quant.recipe import stream_fallback

    check_output_path(args.output)
    if args.dtype == "fp16" and args.decode:
        raise BadInput("--dtype fp16 is for the logits graph only: export the --decode graph with --dtype fp32")
    recipe = c.recipe_from(args)
    fallback, defaulted = stream_fallback(args.fallback, recipe) if args.stream else (args.fallback, False)
    if defaulted:  # streamed, the default is none (an explicit --fallback auto is refused by quantize_streamed)
        args.fallback = fallback
        recipe = c.recipe_from(args)
        if not args.json:
            print("sq-export export: --stream: --fallback none (auto needs the whole model; give N or NAMES to keep "
                  "Linears in float)", file=sys.stderr)
    # the float32 logits and decode graphs are exported from placeholders, each weight read from the checkpoint when
    # written (host memory ≈ the largest tensor: sq_export.stream.lazy); the float16 graph and the GPU trace trace
    # the loaded model (where --trace-device says)
    lazy = args.dtype == "fp32" and args.trace_device == "cpu"
    if args.stream is not None and recipe.mode == "fp" and args.stream:
        raise BadInput(f"--mode fp --stream takes no DIR ({args.stream}): nothing is quantized, the float graph is "
                       "written from MODEL's safetensors")
    if args.stream is not None and recipe.mode != "fp" and not args.stream:
        raise BadInput("--stream needs DIR for a quantized graph (the smoothed checkpoint and its scales go there); "
                       "only --mode fp --stream takes none")
    t = time.perf_counter()
    if args.stream is not None and recipe.mode == "fp" and lazy:
        qm = api.load_float(args.model, lazy=True)
    elif args.stream:
        tok = api.load_tokenizer(args.tokenizer or args.model)
        api.quantize_streamed(args.model, args.stream, recipe, tokenizer=tok, device=args.device, dtype=args.model_dtype)
        qm = api.load_quantized(args.stream, lazy=True) if lazy else api.load_quantized(args.stream, device=args.trace_device)
    else:
        model, tok, _ = c.load(args)
        qm = api.quantize(model, recipe=recipe, tokenizer=tok, source=args.model)
    res = api.export_onnx(qm, args.output, weights=args.weights, target=args.target, dtype=args.dtype, decode=args.decode,
                          trace_device=args.trace_device)
    prep = qm.prepared
    head = bool(prep.graph_meta.get("quantize_lm_head"))
    out = res.to_json()
    out.update({"mode": recipe.mode, "recipe": recipe.describe(), "alpha": prep.alpha, "quantized_layers": len(prep.quantized) + head,
                "fp16_layers": list(prep.fp16_layers), "seconds": round(time.perf_counter() - t, 1)})
    if args.json:
        c.emit_json(out)
    else:
        print(f"wrote {res.path} ({res.bytes / 1e6:.1f} MB, {res.nodes} nodes, {len(prep.quantized)} quantized Linears"
              f"{' + LM head' if head else ''}{f', {len(prep.fp16_layers)} kept in float' if prep.fp16_layers else ''}; {recipe.describe()})")
    return 0
