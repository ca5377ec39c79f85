"""sq-export diagnose MODEL: per-Linear output SQNR, naive W8A8 vs SmoothQuant W8A8 (PyTorch), worst first; with
--tokens the token view (sq_export.measure.outliers): which token positions and ids carry the largest |x|."""

from sq_export.commands import _common as c

HELP = "per-Linear output SQNR (dB) of naive vs SmoothQuant W8A8 on a calibration window, worst first"


def add_parser(sub):
    p = sub.add_parser(
        "diagnose",
        help=HELP,
        description=HELP
        + ".\nBoth fake-quantized models and the float model run end to end on the same calibration window(s); each "
        "Linear's output is compared with the float model's (errors of earlier layers included, as deployed)."
        "\n--tokens: the token view instead: per decoder layer, which token positions and token ids carry the largest |x| "
        "at each quantized Linear's input and in the residual stream (decoder layer outputs), on --windows calibration "
        "windows of --calib-seq-len tokens: top tokens with position, id, text, max|x| and ratio to the median token; "
        "with -o also DIR/tokens.png and DIR/tokens.json."
        "\nExamples:\n  sq-export diagnose smollm2 --samples 32\n  sq-export diagnose smollm2 --smooth-pairs --alpha auto -o out/diag --json"
        "\n  sq-export diagnose smollm2 --tokens --windows 8 -o out/diag",
    )
    c.add_model(p)
    c.add_device(p)
    p.add_argument("--act", default="static", choices=["static", "dynamic-tensor", "dynamic-token"], help="activation quantization of both models (default static, what TensorRT runs)")
    p.add_argument("--windows", type=int, default=2, metavar="N", help="calibration windows to measure on (default 2)")
    p.add_argument("--top", type=int, default=20, metavar="K", help="rows of the text table (default 20; --json has all)")
    p.add_argument("-o", "--output", metavar="DIR", help="write DIR/sqnr.png (bar chart) and DIR/diagnose.json (--tokens: DIR/tokens.png and DIR/tokens.json)")
    p.add_argument("--tokens", action="store_true", help="the token view: per layer, the token positions and ids with the largest |x| (float model)")
    p.add_argument("--threshold", type=float, default=64.0, metavar="R", help="--tokens: a token is an outlier over R times its window's median token (default 64, PrefixQuant's eta)")
    c.add_tokenizer(p)
    c.add_recipe(p, modes=False, runtime=False)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=run)
    return p


def run(args):
    import json
    import time
    from pathlib import Path

    from sq_export import api
    from sq_export.errors import BadInput

    if args.windows < 1:
        raise BadInput(f"--windows {args.windows} must be at least 1")
    if args.tokens:
        return token_view(args)
    if args.fallback not in (None, "none"):
        raise BadInput("diagnose measures every Linear quantized: --fallback does not apply")
    t0 = time.perf_counter()
    args.fallback = "none"
    recipe = c.recipe_from(args, act=args.act)
    model, tok, _ = c.load(args)
    out = Path(args.output) if args.output else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    res = api.linear_sqnr(model, tok, recipe, windows=args.windows, plot=out / "sqnr.png" if out else None)
    res_json = {"model": args.model, "act": args.act, **res}
    if out:
        (out / "diagnose.json").write_text(json.dumps({k: v for k, v in res_json.items() if k != "png"}, indent=1, sort_keys=True) + "\n")
    res_json["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        c.emit_json(res_json)
    else:
        db = lambda x: "exact" if x is None else f"{x:7.2f}"  # noqa: E731
        print(f"per-Linear output SQNR (dB), {res['family']}, act {args.act}, alpha {res['alpha']}, {res['tokens']} tokens; "
              "worst SmoothQuant first")
        print(f"{'Linear':<48} {'naive':>7} {'sq':>7}")
        for r in res["rows"][: args.top]:
            print(f"{r['linear']:<48} {db(r['naive_db'])} {db(r['sq_db'])}")
        m = res["mean_sqnr_db"]
        print(f"mean: naive {m['naive']:.2f} dB, SmoothQuant {m['sq']:.2f} dB" + (f"; chart {res['png']}" if out else ""))
    return 0


def token_view(args):
    import json
    import time
    from pathlib import Path

    from sq_export import api

    t0 = time.perf_counter()
    model, tok, _ = c.load(args)
    out = Path(args.output) if args.output else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    rep = api.token_outliers(model, tok, Path(args.calib_text) if args.calib_text else None, windows=args.windows,
                             seq_len=args.calib_seq_len, threshold=args.threshold, plot=out / "tokens.png" if out else None,
                             prefix_outliers=args.prefix_outliers)
    table = rep.pop("text_table")
    rep.update({"model": args.model, "seconds": round(time.perf_counter() - t0, 1)})
    if out:
        (out / "tokens.json").write_text(json.dumps(rep, indent=1, sort_keys=True) + "\n")
    if args.json:
        c.emit_json(rep)
    else:
        pre = rep.get("prefix_outliers")
        print(f"token view: max|x| per token, {rep['windows']} windows x {rep['seq_len']} tokens"
              + (f", after the outlier prefix {pre['tokens']} {pre['text']!r}" if pre else ""))
        print(table)
        if out:
            print(f"chart {rep['png']}, table {out / 'tokens.json'}")
    return 0
