from sq_export.errors import UnsupportedModel
from sq_export.families import Family, register


@register
class OPT(Family):
    name = "opt"
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    norm_groups = (
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    )
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    # fc1 → ReLU → fc2 is not linear, so fc2's input has no exact fold; v_proj → out_proj is (per head, linear).
    linear_pairs = (("self_attn.v_proj", "self_attn.out_proj"),)
    default_alpha = 0.5
    attention_module = "self_attn"
    alpha_note = "paper (Xiao et al. 2023) uses 0.5 for OPT"

    def check_supported(self):
        if not getattr(self.model.config, "do_layer_norm_before", True):
            raise UnsupportedModel(
                "this OPT variant is post-LayerNorm (do_layer_norm_before=False, e.g. opt-350m): its norms do not "
                "feed the Linears, so smoothing cannot be folded; use a pre-LN OPT"
            )
