"""sq-export eval MODEL|MODEL.onnx: perplexity (PyTorch fake-quant, or ONNX Runtime for .onnx)."""

from sq_export.commands import _common as c

HELP = ("perplexity of a model (PyTorch, fp / naive / SmoothQuant W8A8), an exported .onnx (ONNX Runtime), or, on a "
        "token file, a TensorRT engine or segment manifest")


def add_parser(sub):
    p = sub.add_parser(
        "eval",
        help=HELP,
        description=HELP + ".\nExamples:\n  sq-export eval smollm2 --mode sq --json\n  sq-export eval out/sq.onnx --tokenizer smollm2"
        "\n  sq-export eval out/sq.engine --tokens t.npz --json      # torch-free: runs where only TensorRT is",
    )
    c.add_model(p, "; or an exported .onnx; with --tokens also a TensorRT engine or a *.segments.json manifest")
    c.add_device(p)
    p.add_argument("--text", metavar="FILE", help="evaluation text (default: the shipped held-out split)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L", help="chunk length (default 512)")
    p.add_argument("--max-tokens", type=int, default=32768, metavar="N", help="evaluate the first N tokens (default 32768; 0 = all)")
    p.add_argument("--act", default="static", choices=["static", "dynamic-tensor", "dynamic-token", "none"], help="activation quantization: static per-tensor (O3, TensorRT), dynamic per-tensor (O2), dynamic per-token (O1), none (W8A16)")
    p.add_argument("--tokens", metavar="FILE", help="a token file (`sq-export tokens`): the perplexity of an .onnx graph, an engine or a manifest on exactly these ids (imports no torch)")
    p.add_argument("--tokenizer", metavar="MODEL", help="where the tokenizer is (.onnx: default the source recorded in the graph; a model: default MODEL itself)")
    c.add_recipe(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=run)
    return p


def run(args):
    import time

    from sq_export.errors import BadInput

    if args.tokens:
        return eval_tokens(args)
    from sq_export import api

    if args.seq_len < 2:
        raise BadInput(f"--seq-len {args.seq_len} must be at least 2")
    max_tokens = args.max_tokens or None
    t0 = time.perf_counter()
    if args.model.endswith(".onnx"):
        res = eval_onnx(args, max_tokens)
    else:
        recipe = c.recipe_from(args, act=args.act)
        model, tok, fam = c.load(args)
        ids = api.text_ids(tok, args.text, "eval")
        qm = api.quantize(model, recipe=recipe, tokenizer=tok, source=args.model)
        prep = qm.prepared
        t = time.perf_counter()
        r = api.perplexity(qm, text=ids, seq_len=args.seq_len, max_tokens=max_tokens)
        res = {
            **r,
            "backend": "pytorch",
            "mode": recipe.mode,
            "recipe": recipe.describe(),
            "act": recipe.act if recipe.mode != "fp" else None,
            "alpha": prep.alpha,
            "alpha_per_group": prep.alpha_per_group,
            "smooth_pairs": recipe.linear_pairs,
            "clip": recipe.clip or "max",
            "family": fam.name,
            "quantized_layers_total": len(prep.quantized),
            "fp16_layers": list(prep.fp16_layers),
            "eval_seconds": round(time.perf_counter() - t, 1),
            **{k: round(v, 1) for k, v in prep.times.items()},
            **prep.graph_meta,
            **({"prefix_outliers": prep.prefix.summary()} if prep.prefix is not None else {}),
        }
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        c.emit_json(res)
    else:
        print(f"perplexity {res['perplexity']:.4f} over {res['tokens']} tokens ({res.get('backend')}, "
              f"{res.get('recipe') or 'mode ' + str(res.get('mode'))}, act {res.get('act')}, alpha {res.get('alpha')})")
    return 0


def eval_onnx(args, max_tokens):
    from pathlib import Path

    from sq_export import api
    from sq_export.errors import BadInput
    from sq_export.measure.perplexity import onnx_perplexity
    from sq_export.onnxio.meta import read_metadata

    if not Path(args.model).is_file():
        raise BadInput(f"ONNX file {args.model} not found")
    meta = read_metadata(args.model)
    src = args.tokenizer or meta.get("source_model")
    if not src:
        raise BadInput(f"{args.model} does not record its source model: pass --tokenizer MODEL")
    ids = api.text_ids(api.load_tokenizer(src), args.text, "eval")
    r = onnx_perplexity(args.model, ids, args.seq_len, max_tokens)
    return {
        **r,
        "backend": "onnxruntime",
        "mode": meta.get("mode"),
        "act": meta.get("act"),
        "alpha": None if meta.get("alpha") in (None, "None", "") else meta["alpha"] if meta["alpha"] in ("auto", "kl") else float(meta["alpha"]),
        "quantized_layers_total": int(meta.get("quantized_layers_total", 0)),
        "fp16_layers": [x for x in meta.get("fp16_layers", "").split(",") if x],
    }


def eval_tokens(args) -> int:
    """--tokens: the perplexity of a graph, an engine or a manifest on a token file (sq_export.engine.run, no torch)."""
    from sq_export.engine.run import model_kind, model_perplexity

    kind = model_kind(args.model)  # BadInput for anything else (a model folder takes --text, not --tokens)
    res = model_perplexity(args.model, args.tokens)
    res["kind"] = kind
    if args.json:
        c.emit_json(res)
    else:
        v = "not finite" if res["perplexity"] is None else f"{res['perplexity']:.4f}"
        print(f"perplexity {v} over {res['predicted_tokens']} tokens ({res['backend']}, {args.model})")
    return 0
