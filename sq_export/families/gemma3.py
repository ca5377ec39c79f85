from sq_export.families import register
from sq_export.families.llama import Llama


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
    norm_groups = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    # linears, linear_pairs, default α 0.85, attention module and GQA kv_repeat: as Llama
    alpha_note = ("Llama-class (RMSNorm, gated MLP): 0.85; gemma-3-270m static W8A8 with --smooth-pairs: perplexity 51.3 at "
                  "0.85, 58.7 at 0.5 (FP32 46.6; norms only: 81.1 vs 80.6)")

