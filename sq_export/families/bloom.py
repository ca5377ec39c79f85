from sq_export.errors import UnsupportedModel
from sq_export.families import Family, register


@register
class Bloom(Family):
    name = "bloom"
    model_types = ("bloom",)
    layers_path = "transformer.h"
    norm_groups = (
        ("input_layernorm", ("self_attention.query_key_value",)),
        ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    )
    linears = (
        "self_attention.query_key_value",
        "self_attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    )
    # fused QKV interleaves q/k/v per head, and GELU sits between the MLP Linears: no exact Linear → Linear fold.
    default_alpha = 0.5
    alpha_note = "paper (Xiao et al. 2023) uses 0.5 for BLOOM"
    attention_module = "self_attention"
    position_ids = False  # alibi from attention_mask

    def check_attention_supported(self):
        c = self.model.config
        if getattr(c, "pretraining_tp", 1) > 1 and getattr(c, "slow_but_exact", False):
            raise UnsupportedModel("--quantize-attention: BLOOM with pretraining_tp > 1 and slow_but_exact is not supported")

    def attention_forward(self):
        return _bloom_forward

def _bloom_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False, output_attentions=False, **kwargs):
    """BloomAttention.forward (transformers 5) with the four INT8 points; pretraining_tp slicing not supported."""
    import torch
    import torch.nn.functional as F
    from transformers.models.bloom.modeling_bloom import dropout_add

    from sq_export.quant.attention import _STATE, _observe

    st = getattr(self, _STATE, None)
    batch_size, q_length, _ = hidden_states.shape
    query_layer, key_layer, value_layer = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        key_layer, value_layer = layer_past.update(key_layer, value_layer, self.layer_idx)
    query_layer = query_layer.reshape(batch_size * self.num_heads, -1, self.head_dim)
    key_layer = key_layer.reshape(batch_size * self.num_heads, -1, self.head_dim).transpose(-1, -2)
    value_layer = value_layer.reshape(batch_size * self.num_heads, -1, self.head_dim)
    q = _observe(st, "q", query_layer)
    kt = _observe(st, "k", key_layer)
    scores = alibi * self.beta + torch.bmm(q, kt) * self.inv_norm_factor
    attn_weights = scores.view(batch_size, self.num_heads, q_length, -1)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_layer.dtype)
    probs = self.attention_dropout(probs)
    p = _observe(st, "p", probs.view(batch_size * self.num_heads, q_length, -1))
    v = _observe(st, "v", value_layer)
    context = self._merge_heads(torch.bmm(p, v))
    out = self.dense(context)
    out = dropout_add(out, residual, self.hidden_dropout, self.training)
    return out, probs
