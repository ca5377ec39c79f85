import contextlib

from sq_export.families import register
from sq_export.families.llama import Llama

# The exported graph carries Gemma's residual stream divided by 2**RESIDUAL_SHIFT (issue 16). Gemma-3-270m's stream
# reaches |x| = 95,270 on held-out text (layers 9-16, lab/2026-11-29/logs4/gemma/), above FP16's 65,504: in a
# TensorRT FP16 engine that one token's value is inf, its next norm NaN, and attention spreads the NaN to every
# position (softmax weight 0 × NaN value = NaN), so every logit was non-finite. Divided by 4 the stream peaks at
# 23,818. The shift is exact in float32 (powers of two); 2 and not more because the pre-norms' ε (1e-6) is divided
# by 4**shift and must stay above FP16's smallest subnormal (6e-8): 1e-6/16 = 6.25e-8 does.
RESIDUAL_SHIFT = 2


def residual_scaled(model, shift: int | None = None):
    """While exporting: the residual stream of a Gemma-3 model divided by s = 2**shift, exactly.

    Every reader of the stream is a norm (input_layernorm, pre_feedforward_layernorm, the final norm), and
    RMSNorm(x/s) with ε/s² equals RMSNorm(x) (x/s / sqrt(mean(x²)/s² + ε/s²)); every writer gets a multiply by 1/s:
    the scaled embedding and the two post-norms (post_attention_layernorm, post_feedforward_layernorm), whose
    outputs are added to the stream. Forward hooks (a Mul by a power of two each, traced into the graph) and the
    pre-norms' ε attribute: no weight is touched (lazy placeholders stay valid), and all of it is undone on exit.
    Every factor is a power of two, and scaling by one commutes with float rounding: the float32 graph computes the
    same bits (barring subnormals; tests/test_gemma_fp16_range.py); the KV cache (k, v from normalized inputs) too."""
    s = 2.0 ** (RESIDUAL_SHIFT if shift is None else shift)

    @contextlib.contextmanager
    def patch():
        if s == 1.0:
            yield
            return
        base = model.get_submodule("model")
        layers = base.get_submodule("layers")
        hooks, eps = [], []

        def div(mod, args, out):
            return out * (1.0 / s)

        try:
            hooks.append(base.embed_tokens.register_forward_hook(div))
            for layer in layers:
                for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
                    hooks.append(getattr(layer, name).register_forward_hook(div))
                for name in ("input_layernorm", "pre_feedforward_layernorm"):
                    eps.append((getattr(layer, name), getattr(layer, name).eps))
            eps.append((base.norm, base.norm.eps))
            for mod, e in eps:
                mod.eps = e / (s * s)
            yield
        finally:
            for h in hooks:
                h.remove()
            for mod, e in eps:
                mod.eps = e

    return patch()


GELU_CLIP = 10.0


def gelu_tanh_clipped(model):
    """While exporting: Gemma's GELU (tanh form) with the cube computed on x clipped to [-10, 10].

    At opset 17 the exporter writes 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x·x·x))) node by node, and Gemma-3-270m's
    gate projection reaches |x| = 68 (layer 0), so x³ = 314,720: inf in FP16 (issue 16). It only feeds tanh, which
    is ±1 in float32 for every argument past ±9.1 — reached at |x| = 10 (√(2/π)·(10 + 44.7) = 43.6) — so
    clipping x inside the tanh leaves every output bit as it was, and the largest intermediate is 2·|x|, not |x|³.
    The outer factor 0.5·x keeps the unclipped x. Only the GELUTanh modules (ACT2FN["gelu_pytorch_tanh"]) are
    patched, and restored on exit."""
    import math

    import torch

    beta, kappa = math.sqrt(2.0 / math.pi), 0.044715

    def act(x):
        xc = x.clamp(-GELU_CLIP, GELU_CLIP)
        inner = beta * (xc + kappa * (xc * (xc * xc)))
        return 0.5 * (x * (1.0 + torch.tanh(inner)))

    @contextlib.contextmanager
    def patch():
        mods = [m for m in model.modules() if type(m).__name__ == "GELUTanh" and hasattr(m, "act")]
        old = [m.act for m in mods]
        try:
            for m in mods:
                m.act = act
            yield
        finally:
            for m, a in zip(mods, old):
                m.act = a

    return patch()


@register
class Gemma3(Llama):
    """transformers' Gemma3ForCausalLM (text-only Gemma 3, model_type "gemma3_text", e.g. gemma-3-270m / 1b).

    A layer: x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))); attention applies q_norm / k_norm per head
    to q and k after their projections; the embedding is scaled by sqrt(hidden); sliding-window and global layers
    alternate (config.layer_types).

    Groups: input_layernorm → q/k/v_proj, pre_feedforward_layernorm → gate/up_proj. Gemma's RMSNorm multiplies by
    (1 + γ), not γ (norm_form "one_plus_gamma"): the fold sets 1+γ' = (1+γ)/s, i.e. γ' = (1+γ)/s − 1, which divides
    the norm's output exactly by s (modeling.check_plain_norm proves the form numerically before folding).
    Pairs: up → down (down(act(gate)·up) is linear in up's rows) and v → o (attention output is linear in v; GQA:
    one v row feeds num_attention_heads / num_key_value_heads o columns).

    Everything else stays untouched, and that is exact: smoothing only rescales the *inputs* of the Linears fed by
    the two pre-norms (the norm's output is divided by s, the Linears' input columns multiplied by s), and of down /
    o via the pairs, so every smoothed Linear's output is the same function of the layer's input as before (up to
    float rounding). post_attention_layernorm and post_feedforward_layernorm act on o_proj's and down_proj's
    outputs, q_norm / k_norm on q_proj's and k_proj's outputs: all of them see bit-for-bit the same function, so
    they need no change. The residual stream never passes through a smoothed tensor, so the embedding scale
    sqrt(hidden), the final norm and the LM head are untouched too (--quantize-lm-head folds its own factor into
    the final norm, in the same (1+γ) form).
    """

    name = "gemma3"
    model_types = ("gemma3_text",)
    layers_path = "model.layers"
    norm_form = "one_plus_gamma"
    # inside FP16's range (issue 16): the residual stream exported divided by 4, the GELU's cube on clipped x (both exact)
    export_patches = (residual_scaled, gelu_tanh_clipped)
    norm_groups = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    # INT8 engines without the FP16 flag (TensorRT 8.6 on an H200, gemma-3-270m's default-recipe graph, 4 x 256
    # held-out tokens, 2026-11-30 lease, lab/2026-11-29/logs7/device/gemma/): with it the engine scored 68.11 against
    # ONNX Runtime's 65.96 (+3.3 %, top-1 0.878), without it 66.06 (+0.16 %, top-1 0.905; the FP16 engine of the
    # float graph is within 0.25 % of ONNX Runtime). The lease before, on other token ids, gave the same order.
    int8_engine_fp16 = False
    # linears, linear_pairs, default α 0.85, attention module and GQA kv_repeat: as Llama
    alpha_note = ("Llama-class (RMSNorm, gated MLP): 0.85; gemma-3-270m static W8A8 with --smooth-pairs: perplexity 51.3 at "
                  "0.85, 58.7 at 0.5 (FP32 46.6; norms only: 81.1 vs 80.6)")

