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
