"""sq-export tokens MODEL -o tokens.npz: the held-out evaluation chunks as token ids, for the engine side.

TensorRT's Python (the kit's CPython 3.10) has no tokenizer: prepare the chunks here and pass the file to
`sq-export compare --tokens` / engine perplexity. Same chunking as `eval`.

With --prompts N it writes generation prompts instead: the first --prompt-tokens tokens of N evenly spaced long
held-out paragraphs (`prompts` [N, T]) and, with --reference-tokens K, the float model's greedy continuation in
PyTorch (`reference` [N, K]), which `sq-export generate ENGINE --prompts-file` scores agreement against.
"""

from sq_export.commands import _common as c

HELP = "tokenize evaluation text into an .npz of chunks (input for compare/engine perplexity where no tokenizer exists)"


def add_parser(sub):
    p = sub.add_parser("tokens", help=HELP, description=HELP + ". Example: sq-export tokens smollm2 --seq-len 256 --max-tokens 8192 -o out/tokens.npz")
    c.add_model(p, " whose tokenizer to use (or an .onnx that records its source model)")
    p.add_argument("--text", metavar="FILE", help="text (default: the shipped held-out split)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L")
    p.add_argument("--max-tokens", type=int, default=32768, metavar="N", help="0 = all")
    p.add_argument("--prompts", type=int, default=0, metavar="N", help="write N generation prompts instead of eval chunks")
    p.add_argument("--prompt-tokens", type=int, default=32, metavar="T", help="tokens per prompt (default 32)")
    p.add_argument("--reference-tokens", type=int, default=0, metavar="K", help="with --prompts: also the float model's K greedy tokens (PyTorch)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.npz")
    p.set_defaults(func=run)
    return p


def run(args):
    import io

    import numpy as np

    from sq_export.fileio import atomic_file, check_output_path
    from sq_export.textdata import eval_chunks_npz

    check_output_path(args.output)
    from sq_export.modeling import load_tokenizer

    from sq_export.errors import BadInput

    if args.prompts < 0 or args.prompt_tokens < 1 or args.reference_tokens < 0:
        raise BadInput("--prompts, --reference-tokens must be >= 0 and --prompt-tokens >= 1")
    if args.reference_tokens and not args.prompts:
        raise BadInput("--reference-tokens needs --prompts N")
    tok = load_tokenizer(args.model)
    if args.prompts:
        from sq_export.measure.generate import heldout_prompts

        rows = heldout_prompts(tok, args.prompts, args.prompt_tokens, args.text)
        if min(len(r) for r in rows) < args.prompt_tokens:
            raise BadInput(f"a held-out paragraph has fewer than {args.prompt_tokens} tokens: lower --prompt-tokens")
        d = {"prompts": np.stack(rows).astype(np.int64)}
        if args.reference_tokens:
            from sq_export.measure.generate import greedy_torch
            from sq_export.modeling import load_model

            model, _, _ = load_model(args.model)
            d["reference"] = np.concatenate([greedy_torch(model, r[None, :], args.reference_tokens) for r in d["prompts"]]).astype(np.int64)
        what = f"{args.prompts} prompts x {args.prompt_tokens} tokens" + (f" + {args.reference_tokens} reference tokens each" if args.reference_tokens else "")
    else:
        d = eval_chunks_npz(tok, args.text, args.seq_len, args.max_tokens or None)
        what = f"{d['input_ids'].shape[0]} chunks x {d['input_ids'].shape[1]} tokens"
    buf = io.BytesIO()
    np.savez(buf, **d)
    with atomic_file(args.output) as tmp:
        tmp.write_bytes(buf.getvalue())
    print(f"wrote {args.output}: {what}")
    return 0
