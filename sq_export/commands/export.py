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
        "  sq-export export smollm2 --dtype fp16 -o out/sq16.onnx   # float16 float parts, opset 19 (TensorRT 10+ strongly typed)",
    )
    c.add_model(p, " (or a smoothed folder from `smooth`, with --act-scales of the smoothed model)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    c.add_recipe(p)
    p.add_argument("--weights", choices=["int8", "qdq"], default="int8", help="int8: INT8 initializers -> DQ (half the bytes; TensorRT 10+); qdq: float W -> Q -> DQ (TensorRT 8.6)")
    p.add_argument("--target", choices=["tensorrt", "ort"], default="tensorrt", help="ort: activation Q/DQ as uint8/128 (same grid) so ONNX Runtime runs integer kernels")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="type of the float parts (weights left float, norm gamma/beta, activations, logits); fp16: Q/DQ with float16 scales at opset 19, norm statistics in float32 (TensorRT 10+ strongly typed; ONNX Runtime runs it too)")
    p.add_argument("--decode", action="store_true", help="KV-cache decode graph: inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value; outputs logits, present.{i}.key/value (float cache)")
    c.add_quantize_attention(p)
    p.add_argument("--quantize-lm-head", action="store_true", help="also W8A8 the LM head: static per-tensor input scale from the calibration windows, per-channel INT8 weights, in mode sq smoothed into the final norm and the head's own weight copy (a tied input embedding is untouched); stores the head once as INT8 instead of a second float copy; ONNX Runtime prefill 1.8x -> 2.4x FP32 on SmolLM2 for about +1%% perplexity (docs/ONNX.md)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args):
    import time

    from sq_export.export.exporter import export_onnx
    from sq_export.fileio import check_output_path
    from sq_export.onnxio.meta import onnx_metadata
    from sq_export.quant.prepare import prepare

    check_output_path(args.output)
    if args.dtype == "fp16" and getattr(args, "decode", False):
        from sq_export.errors import BadInput

        raise BadInput("--dtype fp16 is for the logits graph only: export the --decode graph with --dtype fp32")
    if args.quantize_lm_head and args.mode == "fp":
        from sq_export.errors import BadInput

        raise BadInput("--quantize-lm-head applies to quantized modes (naive, sq), not --mode fp")
    recipe = c.recipe_from(args)
    recipe.validate()
    t = time.perf_counter()
    model, tok, fam, path = c.load(args)
    prep = prepare(model, tok, fam, recipe)
    attn_meta = {}
    if getattr(args, "quantize_attention", False):
        from sq_export.quant.attention import apply_for_recipe

        attn_meta = apply_for_recipe(model, fam, tok, recipe)
    head_meta = {}
    if args.quantize_lm_head:
        from sq_export.quant.lm_head import apply_for_recipe as quantize_head

        head_meta = quantize_head(model, tok, recipe, fam)
    calibration = f"{args.samples}x{args.calib_seq_len}" if not args.act_scales else args.act_scales
    meta = onnx_metadata(args.model, fam, args.mode, prep, calibration, linear_pairs=recipe.linear_pairs, clip=recipe.clip)
    if attn_meta:
        meta["quantize_attention"] = attn_meta["quantize_attention"]
    if head_meta:
        meta.update({k: v for k, v in head_meta.items() if k in ("quantize_lm_head", "lm_head_alpha")})
    if getattr(args, "decode", False):
        from sq_export.export.decode import export_decode_onnx as write
    else:
        write = export_onnx
    kw = {"dtype": args.dtype} if args.dtype != "fp32" else {}
    res = write(model, fam, args.output, weights=args.weights, target=args.target, meta=meta, **kw)
    res.update(head_meta)
    res.update({"mode": args.mode, "alpha": prep.alpha, "quantized_layers": len(prep.quantized) + bool(head_meta), "fp16_layers": list(prep.fp16_layers), "seconds": round(time.perf_counter() - t, 1)})
    if args.json:
        c.emit_json(res)
    else:
        print(f"wrote {res['onnx']} ({res['bytes'] / 1e6:.1f} MB, {res['nodes']} nodes, {len(prep.quantized)} quantized Linears{' + LM head' if head_meta else ''}, mode {args.mode})")
    return 0
