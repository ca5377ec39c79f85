from sq_export.families import Family, register


@register
class Phi3(Family):
    """transformers' Phi3ForCausalLM (Phi-3 / Phi-3.5 mini): fused qkv_proj and gate_up_proj.

    Pairs on row slices of the fused producers (SmoothGroup.rows):
    - up → down: gate_up_proj's output rows are [gate (I rows); up (I rows)] and the MLP computes
      down(up · act(gate)), which is linear in the up rows: dividing rows I..2I of gate_up_proj by s and multiplying
      down_proj's input columns by s is exact; the gate rows stay as they are.
    - v → o: qkv_proj's rows are [q (H·d); k (KV·d); v (KV·d)]; the attention output is linear in v, so the v rows
      take 1/s and o_proj's columns s, with grouped-query attention's repeat (one v row feeds H/KV o columns).
    """

    name = "phi3"
    model_types = ("phi3",)
    layers_path = "model.layers"
    norm_groups = (
        ("input_layernorm", ("self_attn.qkv_proj",)),
        ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    )
    linears = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    linear_pairs = (("mlp.gate_up_proj", "mlp.down_proj"), ("self_attn.qkv_proj", "self_attn.o_proj"))
    default_alpha = 0.85
    attention_module = "self_attn"
    alpha_note = "Llama-class (RMSNorm, SwiGLU): 0.85 as for Llama"

    def _heads(self):
        c = self.model.config
        d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return c.num_attention_heads, kv, d

    def kv_repeat(self, producer, consumer):
        if producer.endswith("qkv_proj"):
            h, kv, _ = self._heads()
            return h // kv
        return 1

    def pair_rows(self, producer, consumer):
        if producer.endswith("qkv_proj"):
            h, kv, d = self._heads()
            return ((h * d + kv * d, h * d + 2 * kv * d),)
        if producer.endswith("gate_up_proj"):
            i = self.model.config.intermediate_size
            return ((i, 2 * i),)
        return ()
