"""sq-export generate MODEL|DECODE.onnx --prompt TEXT: greedy decoding through PyTorch or ONNX Runtime."""

from sq_export.commands import _common as c

HELP = "greedy text generation: PyTorch (fp / naive / SmoothQuant W8A8) or an exported decode graph (ONNX Runtime)"


def add_parser(sub):
    p = sub.add_parser(
        "generate",
        help=HELP,
        description=HELP
        + ".\nExamples:\n  sq-export generate smollm2 --mode sq --prompt 'The capital of France is' --max-new-tokens 16\n"
        "  sq-export export smollm2 --decode -o out/dec.onnx && sq-export generate out/dec.onnx --prompt 'Hello'",
    )
    c.add_model(p, "; or a decode graph .onnx from `export --decode`")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--tokenizer", metavar="MODEL", help="for .onnx: where the tokenizer is (default: the source recorded in the ONNX)")
    p.add_argument("--threads", type=int, default=None, metavar="T", help="ONNX Runtime intra-op threads")
    p.add_argument("--mode", default="fp", choices=["fp", "naive", "sq"], help="PyTorch: fp (default), naive W8A8 or SmoothQuant W8A8 fake quantization")
    c.add_recipe(p, modes=False)
    from sq_export.attention import add_argument as _add_attn

    _add_attn(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=run)
    return p


def _tokenizer_for_onnx(args, meta):
    from sq_export.errors import BadInput
    from sq_export.modeling import load_tokenizer

    src = args.tokenizer or meta.get("source_model")
    if not src:
        raise BadInput(f"{args.model} does not record its source model: pass --tokenizer MODEL")
    return load_tokenizer(src)


def run(args):
    import time
    from pathlib import Path

    import numpy as np

    from sq_export.decode import greedy_onnx, greedy_torch
    from sq_export.errors import BadInput

    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    t0 = time.perf_counter()
    res = {"prompt": args.prompt}
    if args.model.endswith(".onnx"):
        from sq_export.evaluate import ort_session
        from sq_export.export import read_metadata

        if not Path(args.model).is_file():
            raise BadInput(f"ONNX file {args.model} not found")
        meta = read_metadata(args.model)
        tok = _tokenizer_for_onnx(args, meta)
        ids = np.asarray([tok(args.prompt)["input_ids"]], dtype=np.int64)
        if ids.shape[1] == 0:
            raise BadInput("--prompt tokenizes to nothing")
        sess = ort_session(args.model, args.threads)
        t = time.perf_counter()
        out = greedy_onnx(sess, ids, args.max_new_tokens, tok.eos_token_id)
        res.update({"backend": "onnxruntime", "mode": meta.get("mode"), "quantize_attention": meta.get("quantize_attention") or None})
    else:
        from sq_export.recipe import prepare

        args.act = "static"
        recipe = c.recipe_from(args)
        recipe.validate()
        model, tok, fam, _ = c.load(args)
        prep = prepare(model, tok, fam, recipe)
        attn = {}
        if args.quantize_attention:
            from sq_export.attention import apply_for_recipe

            attn = apply_for_recipe(model, fam, tok, recipe)
        ids = np.asarray([tok(args.prompt)["input_ids"]], dtype=np.int64)
        if ids.shape[1] == 0:
            raise BadInput("--prompt tokenizes to nothing")
        t = time.perf_counter()
        out = greedy_torch(model, ids, args.max_new_tokens, tok.eos_token_id)
        res.update({"backend": "pytorch", "mode": args.mode, "alpha": prep.alpha, "quantize_attention": attn.get("quantize_attention")})
    gen_s = time.perf_counter() - t
    tokens = [int(x) for x in out[0]]
    res.update({
        "tokens": tokens,
        "text": tok.decode(tokens, skip_special_tokens=True),
        "new_tokens": len(tokens),
        "tokens_per_s": round(len(tokens) / gen_s, 2) if gen_s > 0 else None,
        "seconds": round(time.perf_counter() - t0, 1),
    })
    if args.json:
        c.emit_json(res)
    else:
        print(args.prompt + res["text"])
    return 0
