"""sq-export compare A B [C ...] --tokens FILE: accuracy of ONNX graphs / TensorRT engines against the first one.

Torch-free for token files (runs under a bare TensorRT Python). Exit 1 when a tolerance fails.
Hook for text input: `tokens_from_args(args)` is the one place that turns the command line into a
sq_export.engine.run.Tokens; a --text option (tokenized on the torch side) plugs in there.
"""

from __future__ import annotations

import json
import sys

HELP = "compare ONNX graphs (ONNX Runtime) and TensorRT engines on real token batches; the first is the reference"

EXAMPLES = """examples:
  sq-export compare out/fp.onnx out/sq.onnx out/sq.engine --tokens out/tokens.npz
  sq-export compare out/sq.onnx out/sq.engine --tokens out/tokens.npz --batches 8 --min-cosine 0.999 --perplexity --json
metrics per model and output (valid positions only): max/mean |error|, cosine similarity per position (mean, min),
top-1 agreement (argmax over the vocabulary). --atol/--rtol: Polygraphy's element-wise check, off unless given.
exit codes: 0 all within tolerance, 1 a tolerance failed, 2 bad input, 3 TensorRT/GPU missing (for engines)."""


def add_parser(sub):
    import argparse

    from sq_export.engine.compare import DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1

    p = sub.add_parser(
        "compare",
        help=HELP,
        description=HELP + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx graphs and/or .engine files; the first is the reference")
    p.add_argument("--tokens", metavar="FILE", help="token file (.npz: input_ids, attention_mask[, lengths]) from `sq-export tokens`")
    p.add_argument("--text", metavar="FILE", help="without --tokens: tokenize this text (default: the held-out split) with the first .onnx's source model tokenizer")
    p.add_argument("--tokenizer", metavar="MODEL", help="with --text: where the tokenizer is (default: the source model recorded in the first .onnx)")
    p.add_argument("--seq-len", type=int, default=256, metavar="L", help="with --text: chunk length (default 256)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="with --text: tokens to take (default 4096)")
    p.add_argument("--batches", type=int, default=4, metavar="N", help="batches to compare (default 4; 0 = the whole file)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="chunks per batch (default 1; engines: within the profile)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance, element-wise with --rtol (default: unchecked)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance, element-wise with --atol (default: unchecked)")
    p.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE, help=f"minimum mean cosine similarity (default {DEFAULT_MIN_COSINE}; -1 disables)")
    p.add_argument("--min-top1", type=float, default=DEFAULT_MIN_TOP1, help=f"minimum top-1 agreement (default {DEFAULT_MIN_TOP1}; 0 disables)")
    p.add_argument("--outputs", nargs="+", metavar="NAME", help="outputs to compare (default: all of the reference's)")
    p.add_argument("--perplexity", action="store_true", help="also report each model's perplexity on the whole token file")
    p.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    p.set_defaults(func=run)
    return p


def tokens_from_args(args):
    """The token source for this run: a sq_export.engine.run.Tokens. Extend here for --text (torch side)."""
    from sq_export.engine.run import load_tokens
    from sq_export.errors import BadInput

    if getattr(args, "tokens", None):
        return load_tokens(args.tokens)
    src = args.tokenizer or next((m for m in args.models if m.endswith(".onnx")), None)
    if src is None:
        raise BadInput("comparing engines only: pass --tokens FILE (`sq-export tokens` writes one) or --tokenizer MODEL")
    try:  # the torch side's tokenizer (transformers); absent where only TensorRT is installed
        from sq_export.modeling import load_tokenizer
        from sq_export.engine.run import Tokens
        from sq_export.textdata import eval_chunks_npz
    except ImportError as e:
        raise BadInput(f"no tokenizer here ({e.name} missing): prepare the tokens elsewhere with `sq-export tokens` and pass --tokens") from None
    if not args.tokenizer:
        from sq_export.onnxio.meta import read_metadata

        if not read_metadata(src).get("source_model"):
            raise BadInput(f"compare needs --tokens FILE or --tokenizer MODEL: {src} records no source model to tokenize with")
    d = eval_chunks_npz(load_tokenizer(src), args.text, args.seq_len, args.max_tokens or None)
    return Tokens(d["input_ids"], d["attention_mask"], d["lengths"], path=f"text:{args.text or 'held-out split'}")


def run(args) -> int:
    from sq_export.engine.compare import compare, format_table
    from sq_export.engine.run import model_kind
    from sq_export.errors import BadInput

    if len(args.models) < 2:
        raise BadInput("compare needs at least two models (the first is the reference)")
    for m in args.models:
        model_kind(m)
    import contextlib

    tokens = tokens_from_args(args)
    # With --json, stdout carries only the JSON line: Polygraphy/TensorRT log lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = compare(
            args.models,
            tokens,
            batches=None if args.batches == 0 else args.batches,
            batch_size=args.batch_size,
            atol=args.atol,
            rtol=args.rtol,
            min_cosine=None if args.min_cosine is not None and args.min_cosine <= -1 else args.min_cosine,
            min_top1=None if args.min_top1 is not None and args.min_top1 <= 0 else args.min_top1,
            perplexity=args.perplexity,
            outputs=args.outputs,
        )
    if args.json:
        sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    else:
        print(format_table(report))
    return 0 if report["passed"] else 1
