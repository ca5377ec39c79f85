from sq_export.families import Family, register


@register
class GPTNeoX(Family):
    """transformers' GPTNeoXForCausalLM (Pythia, GPT-NeoX-20B): LayerNorm, fused query_key_value, GELU MLP.

    With use_parallel_residual=True (Pythia) a layer computes x + attn(ln1(x)) + mlp(ln2(x)): both norms read the
    same residual input, and each is its own smoothing group (ln1 → query_key_value, ln2 → dense_h_to_4h), exactly
    as in the sequential form (use_parallel_residual=False, x += attn(ln1(x)); x += mlp(ln2(x)), like GPT-2).

    Pairs: dense_h_to_4h → GELU → dense_4h_to_h is not linear, so no up → down pair. v → dense is: query_key_value's
    output rows are interleaved per head, [q_h (d); k_h (d); v_h (d)] for h = 0..H-1 (the attention views them as
    [..., H, 3d] and chunks the last axis in three), and dense's input column h·d + j reads v_h[j] (rotary touches q
    and k only). So the v rows of head h, 3hd+2d .. 3hd+3d, in head order, take 1/s (weight and bias) and dense's
    columns s.
    """

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    norm_groups = (
        ("input_layernorm", ("attention.query_key_value",)),
        ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    )
    linears = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    linear_pairs = (("attention.query_key_value", "attention.dense"),)
    default_alpha = 0.5
    attention_module = "attention"
    alpha_note = "LayerNorm + GELU like OPT/BLOOM; paper's 0.5"

    def pair_rows(self, producer, consumer):
        c = self.model.config
        h = c.num_attention_heads
        d = c.hidden_size // h
        return tuple((3 * d * i + 2 * d, 3 * d * i + 3 * d) for i in range(h))
