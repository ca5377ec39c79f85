"""sq-export smooth MODEL --act-scales FILE [--alpha A] -o DIR: a smoothed HF folder (safetensors)."""

from sq_export.commands import _common as c

HELP = "fold SmoothQuant factors into norms and Linears; write a smoothed Hugging Face folder"


def add_parser(sub):
    p = sub.add_parser("smooth", help=HELP, description=HELP + ". Example: sq-export smooth smollm2 --act-scales out/act_scales.safetensors -o out/smoothed")
    c.add_model(p)
    c.add_device(p)
    c.add_tokenizer(p)
    p.add_argument("--act-scales", required=True, metavar="FILE", help="act_scales.safetensors from `calibrate` (or a mit-han-lab .pt)")
    p.add_argument("--alpha", type=float, default=None, metavar="A", help="migration strength in [0,1] (default: the family's)")
    c.add_calib(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args):
    from pathlib import Path

    from sq_export import api
    from sq_export.errors import BadInput
    from sq_export.fileio import atomic_dir, check_output_path
    from sq_export.quant.calibrate import Calibration, load_act_scales, validate_act_scales
    from sq_export.quant.recipe import CalibOptions, validate_alpha
    from sq_export.quant.smooth import smooth_checked

    if args.alpha == "auto":
        raise BadInput("smooth takes one --alpha for every group; the per-group search (--alpha auto) runs in export, eval and run")
    if args.alpha not in (None, "default"):
        validate_alpha(args.alpha)
    check_output_path(args.output)
    scales = load_act_scales(args.act_scales)
    model, tok, fam = c.load(args)
    validate_act_scales(scales, model, fam, f"act scales {args.act_scales}")
    alpha = fam.default_alpha if args.alpha in (None, "default") else args.alpha
    ids = api.text_ids(tok, Path(args.calib_text) if args.calib_text else None, "calib")
    calib = Calibration(scales, None, ids, CalibOptions(args.calib_text, args.samples, args.calib_seq_len))
    factors, delta = smooth_checked(model, fam, scales, alpha, calib.check_batch())
    with atomic_dir(args.output) as tmp:
        from safetensors.torch import save_file

        model.config.sq_export = {"smoothed": True, "alpha": alpha, "family": fam.name}
        model.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in factors.items()}, str(tmp / "smoothing_factors.safetensors"))
    summary = {"output": args.output, "alpha": alpha, "groups": len(factors), "max_abs_logit_change": delta}
    if args.json:
        c.emit_json(summary)
    else:
        print(f"wrote {args.output}: {len(factors)} smoothing groups folded (alpha {alpha}); float logits moved {delta:.2e}")
    return 0
