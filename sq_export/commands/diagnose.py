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
    import dataclasses
    import json
    import math
    import time
    from pathlib import Path

    import torch

    from sq_export import api
    from sq_export.errors import BadInput
    from sq_export.measure.sqnr import naive_sq_sqnr
    from sq_export.report import _sqnr_plot
    from sq_export.textdata import calibration_samples

    if args.windows < 1:
        raise BadInput(f"--windows {args.windows} must be at least 1")
    if args.tokens:
        return token_view(args)
    if args.prefix_outliers not in (None, "none"):
        raise BadInput("the SQNR view does not take --prefix-outliers yet; --tokens does (the token view after the prefix)")
    if args.fallback not in (None, "none"):
        raise BadInput("diagnose measures every Linear quantized: --fallback does not apply")
    t0 = time.perf_counter()
    args.fallback = "none"
    recipe = dataclasses.replace(c.recipe_from(args, act=args.act), mode="sq")
    model, tok, fam = c.load(args)
    ids = api.text_ids(tok, recipe.calib.calib_text and Path(recipe.calib.calib_text), "calib")
    L = min(recipe.calib.seq_len, len(ids))
    batch = torch.as_tensor(calibration_samples(ids, args.windows, L, seed=2))
    # calibrate once (the float model is not changed by calibration), share the statistics between both recipes
    calib = api.calibrate(model, tok, recipe=recipe)
    act_max = calib.act_max
    naive = api.quantize(model, calib, recipe.baseline(), copy=True).model
    qm = api.quantize(model, calib, recipe, copy=True)
    sq, prep = qm.model, qm.prepared
    names = fam.quantized_linears()
    # with --smooth-pairs, SQ is compared with the smoothed float model (report.smoothed_reference says why)
    table = naive_sq_sqnr(model, naive, sq, names, batch, family=fam, act_max=act_max,
                          alpha=prep.alpha_per_group or prep.alpha, linear_pairs=recipe.linear_pairs)

    def key(n):
        v = table[n].get("sq")
        return math.inf if v is None else v

    order = sorted(names, key=key)
    rows = [{"linear": n, "naive_db": table[n]["naive"], "sq_db": table[n]["sq"]} for n in order]
    finite = lambda m: [r[m] for r in rows if r[m] is not None]  # noqa: E731
    res_json = {
        "model": args.model,
        "family": fam.name,
        "act": args.act,
        "alpha": prep.alpha,
        "alpha_per_group": prep.alpha_per_group,
        "smooth_pairs": recipe.linear_pairs,
        "clip": recipe.clip or "max",
        "tokens": int(batch.numel()),
        "mean_sqnr_db": {"naive": sum(finite("naive_db")) / max(1, len(finite("naive_db"))), "sq": sum(finite("sq_db")) / max(1, len(finite("sq_db")))},
        "rows": rows,
    }
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        _sqnr_plot(out / "sqnr.png", {n: {"naive": table[n]["naive"], "sq": table[n]["sq"]} for n in order})
        (out / "diagnose.json").write_text(json.dumps(res_json, indent=1, sort_keys=True) + "\n")
        res_json["png"] = str(out / "sqnr.png")
    res_json["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        c.emit_json(res_json)
    else:
        db = lambda x: "exact" if x is None else f"{x:7.2f}"  # noqa: E731
        print(f"per-Linear output SQNR (dB), {fam.name}, act {args.act}, alpha {prep.alpha}, {batch.numel()} tokens; worst SmoothQuant first")
        print(f"{'Linear':<48} {'naive':>7} {'sq':>7}")
        for r in rows[: args.top]:
            print(f"{r['linear']:<48} {db(r['naive_db'])} {db(r['sq_db'])}")
        m = res_json["mean_sqnr_db"]
        print(f"mean: naive {m['naive']:.2f} dB, SmoothQuant {m['sq']:.2f} dB" + (f"; chart {res_json['png']}" if args.output else ""))
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
