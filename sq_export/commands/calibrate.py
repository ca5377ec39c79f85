"""sq-export calibrate MODEL -o DIR: DIR/act_scales.safetensors (per-input-channel max|x| of every quantized Linear)."""

from sq_export.commands import _common as c

HELP = "record per-channel max|x| at every quantized Linear input on calibration text"


def add_parser(sub):
    p = sub.add_parser("calibrate", help=HELP, description=HELP + ". Example: sq-export calibrate smollm2 --samples 64 -o out/")
    c.add_model(p)
    c.add_device(p)
    c.add_tokenizer(p)
    c.add_calib(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for act_scales.safetensors (created if missing)")
    p.add_argument("--stream", action="store_true", help="load one decoder layer at a time from MODEL's safetensors (a model larger than the GPU or host memory); the same act scales as the whole-model pass")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.set_defaults(func=run)
    return p


def run(args):
    import time
    from pathlib import Path

    from sq_export import api
    from sq_export.fileio import check_output_path
    from sq_export.quant.calibrate import ACT_SCALES_FILE, save_act_scales

    out = Path(args.output)
    check_output_path(out / "x") if out.is_dir() else check_output_path(out)
    text = Path(args.calib_text) if args.calib_text else None
    opts = dict(samples=args.samples, seq_len=args.calib_seq_len, batch_size=args.calib_batch, rows=None)
    if args.stream:
        t = time.perf_counter()
        tok = api.load_tokenizer(args.tokenizer or args.model)
        calib = api.calibrate_streamed(args.model, tok, text, device=args.device, dtype=args.model_dtype, **opts)
        model_type = api.model_type(args.model)
    else:
        model, tok, fam = c.load(args)
        t = time.perf_counter()
        calib = api.calibrate(model, tok, text, **opts)
        model_type = model.config.model_type
    scales, meta = calib.act_max, dict(calib.meta)
    secs = meta.pop("seconds")
    out.mkdir(exist_ok=True)
    dest = out / ACT_SCALES_FILE
    save_act_scales(dest, scales, {"model_type": model_type, **meta})
    summary = {"act_scales": str(dest), "linears": len(scales), "seconds": round(time.perf_counter() - t, 1), "calibration_seconds": secs, **meta}
    if args.json:
        c.emit_json(summary)
    else:
        print(f"wrote {dest}: {len(scales)} Linears, {args.samples} x {args.calib_seq_len} tokens in {secs:.0f}s")
    return 0
