from sq_export.families import Family, register


@register
class Llama(Family):
    """Llama and the architectures that share its layout (Mistral, Qwen2, SmolLM)."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    layers_path = "model.layers"
    norm_groups = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    linears = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    # act(gate)·up is linear in up's output rows; attention output is linear in v's rows (GQA: rows repeat).
    linear_pairs = (("mlp.up_proj", "mlp.down_proj"), ("self_attn.v_proj", "self_attn.o_proj"))
    default_alpha = 0.85
    attention_module = "self_attn"
    alpha_note = "mit-han-lab/smoothquant uses 0.8-0.85 for Llama-class models; see README measurement"

    def kv_repeat(self, producer, consumer):
        if producer.endswith("v_proj"):
            c = self.model.config
            return c.num_attention_heads // getattr(c, "num_key_value_heads", c.num_attention_heads)
        return 1
