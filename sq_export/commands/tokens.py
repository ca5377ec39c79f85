"""sq-export tokens MODEL -o tokens.npz: the held-out evaluation chunks as token ids, for the engine side.

TensorRT's Python (the kit's CPython 3.10) has no tokenizer: prepare the chunks here and pass the file to
`sq-export compare --tokens` / engine perplexity. Same chunking as `eval`.
"""

from sq_export.commands import _common as c

HELP = "tokenize evaluation text into an .npz of chunks (input for compare/engine perplexity where no tokenizer exists)"


def add_parser(sub):
    p = sub.add_parser("tokens", help=HELP, description=HELP + ". Example: sq-export tokens smollm2 --seq-len 256 --max-tokens 8192 -o out/tokens.npz")
    c.add_model(p, " whose tokenizer to use (or an .onnx that records its source model)")
    p.add_argument("--text", metavar="FILE", help="text (default: the shipped held-out split)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L")
    p.add_argument("--max-tokens", type=int, default=32768, metavar="N", help="0 = all")
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

    tok = load_tokenizer(args.model)
    d = eval_chunks_npz(tok, args.text, args.seq_len, args.max_tokens or None)
    buf = io.BytesIO()
    np.savez(buf, **d)
    with atomic_file(args.output) as tmp:
        tmp.write_bytes(buf.getvalue())
    print(f"wrote {args.output}: {d['input_ids'].shape[0]} chunks x {d['input_ids'].shape[1]} tokens")
    return 0
