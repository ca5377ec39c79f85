"""sq-export generate MODEL|DECODE.onnx|DECODE.engine: greedy decoding through PyTorch, ONNX Runtime or TensorRT.

The engine path is torch-free (it runs under the lent GPU's TensorRT Python, which has no tokenizer): give it
`--prompts-file` from `sq-export tokens MODEL --prompts N [--reference-tokens K]`, and it reports the agreement
with the float model's tokens stored there. With `--prompt TEXT` a tokenizer is needed (`--tokenizer`, or the source
model recorded in the ONNX).
"""

from sq_export.commands import _common as c

HELP = "greedy text generation: PyTorch (fp / naive / SmoothQuant W8A8), a decode graph (ONNX Runtime) or a decode engine (TensorRT)"


def add_parser(sub):
    import argparse

    p = sub.add_parser(
        "generate",
        help=HELP,
        description=HELP + ".",
        epilog="examples:\n  sq-export generate smollm2 --mode sq --prompt 'The capital of France is' --max-new-tokens 16\n"
        "  sq-export export smollm2 --decode -o out/dec.onnx && sq-export generate out/dec.onnx --prompt 'Hello'\n"
        "  sq-export tokens smollm2 --prompts 8 --reference-tokens 16 -o prompts.npz    # where a tokenizer exists\n"
        "  sq-export build out/dec.onnx -o out/dec.engine --seq 1:32:64 --past 1:64:128\n"
        "  sq-export generate out/dec.engine --prompts-file prompts.npz --max-new-tokens 16 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_model(p, "; or a decode graph .onnx from `export --decode`, or a TensorRT engine built from one")
    c.add_device(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT")
    src.add_argument("--prompts-file", metavar="FILE.npz", help="prompts (and reference tokens) from `sq-export tokens --prompts`; reports agreement with the reference")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--tokenizer", metavar="MODEL", help="for .onnx/.engine with --prompt: where the tokenizer is (default: the source recorded in the ONNX)")
    p.add_argument("--threads", type=int, default=None, metavar="T", help="ONNX Runtime intra-op threads")
    p.add_argument("--mode", default="fp", choices=["fp", "naive", "sq"], help="PyTorch: fp (default), naive W8A8 or SmoothQuant W8A8 fake quantization")
    c.add_recipe(p, modes=False)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=run)
    return p


def _engine_sidecar(engine_path) -> dict:
    """The build sidecar (ENGINE.json) of a single engine; {} when it is missing or unreadable."""
    import json
    from pathlib import Path

    try:
        side = json.loads(Path(str(engine_path) + ".json").read_text())
    except (OSError, ValueError):
        return {}
    return side if isinstance(side, dict) else {}


def _engine_source_onnx(engine_path):
    from pathlib import Path

    from sq_export.onnxio.segments import is_manifest, read_manifest

    if is_manifest(engine_path):  # engine manifest -> ONNX manifest -> the graph it was cut from
        try:
            onnx_man = read_manifest(Path(engine_path).parent / read_manifest(engine_path)["source"])
            return str(Path(onnx_man["path"]).parent / onnx_man["source"])
        except Exception:
            return None
    return _engine_sidecar(engine_path).get("onnx")


def _engine_prefix_length(engine_path) -> int:
    """The outlier prefix length its build sidecar records for the graph (0: none, or no sidecar)."""
    return int((_engine_sidecar(engine_path).get("graph") or {}).get("prefix_length") or 0)


def _tokenizer(args, meta):
    from sq_export.errors import BadInput
    from sq_export.modeling import load_tokenizer

    src = args.tokenizer or meta.get("source_model")
    if not src:
        raise BadInput(f"{args.model} does not record its source model: pass --tokenizer MODEL, or --prompts-file")
    return load_tokenizer(src)


class _OrtGenerator:
    def __init__(self, path, threads):
        from sq_export.measure.perplexity import ort_session

        from sq_export.export.decode import read_prefix

        self.sess = ort_session(path, threads)
        self.prefix = read_prefix(path)  # an outlier prefix: the graph's initial past

    def generate(self, ids, n, eos_token_id=None):
        from sq_export.measure.generate import greedy_onnx

        return greedy_onnx(self.sess, ids, n, eos_token_id, prefix=self.prefix)


def run(args):
    import contextlib
    import time
    from pathlib import Path

    import numpy as np

    from sq_export.engine.run import ENGINE_SUFFIXES
    from sq_export.errors import BadInput
    from sq_export.onnxio.meta import read_metadata
    from sq_export.onnxio.segments import is_manifest

    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    t0 = time.perf_counter()
    res = {"prompt": args.prompt, "model": args.model}
    is_engine = args.model.lower().endswith(ENGINE_SUFFIXES)
    is_onnx = args.model.lower().endswith(".onnx")
    if is_manifest(args.model):  # segments (`sq-export split`): their engines decode as one chain
        from sq_export.engine.run import model_kind

        if model_kind(args.model) != "engine":
            raise BadInput(f"{args.model} lists ONNX segments: generate with the whole graph (ONNX Runtime), or build "
                           "the segments and generate with the engine manifest")
        is_engine = True
    tok = None
    with contextlib.ExitStack() as stack:
        if is_engine or is_onnx:
            if not Path(args.model).is_file():
                raise BadInput(f"{'engine' if is_engine else 'ONNX file'} {args.model} not found")
            src_onnx = _engine_source_onnx(args.model) if is_engine else args.model
            meta = read_metadata(src_onnx) if src_onnx and Path(src_onnx).is_file() else {}
            if is_engine and not meta and _engine_prefix_length(args.model):
                raise BadInput(f"{args.model} was built from a graph with an outlier prefix, whose KV cache lives in that "
                               f"graph: put the .onnx the engine was built from beside it ({src_onnx or 'its sidecar names none'})")
            if is_engine:
                from sq_export.engine.generate import EngineDecoder
                from sq_export.engine.run import polygraphy_logging
                from sq_export.export.decode import read_prefix

                stack.enter_context(polygraphy_logging("ERROR"))
                prefix = read_prefix(src_onnx) if meta.get("prefix_length") else None  # the decode's initial past
                gen = stack.enter_context(EngineDecoder(args.model, prefix=prefix))
                res.update({"backend": "tensorrt"})
            else:
                gen = _OrtGenerator(args.model, args.threads)
                res.update({"backend": "onnxruntime"})
            res.update({"mode": meta.get("mode"), "quantize_attention": meta.get("quantize_attention") or None})
            if args.prompt is not None:
                tok = _tokenizer(args, meta)
        else:
            from sq_export import api
            from sq_export.measure.generate import greedy_torch

            recipe = c.recipe_from(args)
            model, tok, fam = c.load(args)
            qm = api.quantize(model, recipe=recipe, tokenizer=tok, source=args.model)
            prep = qm.prepared

            class _Torch:
                def generate(self, ids, n, eos_token_id=None):
                    return greedy_torch(model, ids, n, eos_token_id)

            gen = _Torch()
            res.update({"backend": "pytorch", "mode": recipe.mode, "recipe": recipe.describe(), "alpha": prep.alpha,
                        "quantize_attention": prep.graph_meta.get("quantize_attention")})

        if args.prompts_file:
            from sq_export.engine.generate import generate_file, load_prompts

            res.pop("prompt")
            res.update(generate_file(gen, load_prompts(args.prompts_file), args.max_new_tokens))
            res["seconds_total"] = round(time.perf_counter() - t0, 1)
            if args.json:
                c.emit_json(res)
            else:
                ag = res.get("agreement_with_reference")
                print(f"{res['prompts']} prompts x {args.max_new_tokens} tokens through {res['backend']} in {res['seconds']:.1f}s"
                      + (f"; agreement with the reference: {ag['token_agreement_pct']:.1f}% of tokens, mean common prefix "
                         f"{ag['mean_common_prefix']:.1f}, {ag['exact_match_prompts']} prompts exact" if ag else ""))
            return 0

        ids = np.asarray([tok(args.prompt)["input_ids"]], dtype=np.int64)
        if ids.shape[1] == 0:
            raise BadInput("--prompt tokenizes to nothing")
        t = time.perf_counter()
        out = gen.generate(ids, args.max_new_tokens, tok.eos_token_id)
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
