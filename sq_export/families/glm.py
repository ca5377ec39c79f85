import contextlib

from sq_export.families import Family, register


def _rotary_without_repeat_interleave(model):
    """The TorchScript ONNX exporter mis-ranks repeat_interleave inside GLM's rotary embedding; swap in the
    same arithmetic written with stack + flatten while exporting."""
    import torch
    from transformers.models.glm import modeling_glm as mg

    def rotate_half(x):
        x1 = x[..., 0::2]
        x2 = x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
        half = cos.shape[-1] // 2
        cos = torch.stack((cos[..., :half], cos[..., :half]), dim=-1).flatten(-2)
        sin = torch.stack((sin[..., :half], sin[..., :half]), dim=-1).flatten(-2)
        rd = cos.shape[-1]
        q_rot, q_pass = q[..., :rd], q[..., rd:]
        k_rot, k_pass = k[..., :rd], k[..., rd:]
        q_embed = torch.cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass], dim=-1)
        k_embed = torch.cat([k_rot * cos + rotate_half(k_rot) * sin, k_pass], dim=-1)
        return q_embed, k_embed

    @contextlib.contextmanager
    def patch():
        old = mg.apply_rotary_pos_emb
        mg.apply_rotary_pos_emb = apply_rotary_pos_emb
        try:
            yield
        finally:
            mg.apply_rotary_pos_emb = old

    return patch()


@register
class GLM(Family):
    """transformers' GlmForCausalLM (GLM-4 9B style): fused gate_up_proj."""

    name = "glm"
    model_types = ("glm",)
    layers_path = "model.layers"
    norm_groups = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    )
    linears = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_up_proj",
        "mlp.down_proj",
    )
    linear_pairs = (("self_attn.v_proj", "self_attn.o_proj"),)
    default_alpha = 0.85
    attention_module = "self_attn"
    alpha_note = "Llama-class (RMSNorm, SwiGLU): 0.85 as for Llama"
    export_patches = (_rotary_without_repeat_interleave,)

    def kv_repeat(self, producer, consumer):
        c = self.model.config
        return c.num_attention_heads // getattr(c, "num_key_value_heads", c.num_attention_heads)
