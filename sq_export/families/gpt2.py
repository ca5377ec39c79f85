from sq_export.errors import UnsupportedModel
from sq_export.families import Family, register


@register
class GPT2(Family):
    """GPT-2 (Conv1D weights are stored [in, out]); stands for Megatron-GPT / MT-NLG style pre-LN models."""

    name = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    norm_groups = (
        ("ln_1", ("attn.c_attn",)),
        ("ln_2", ("mlp.c_fc",)),
    )
    linears = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    default_alpha = 0.5
    attention_module = "attn"
    alpha_note = "pre-LN GPT like OPT; paper's 0.5"

    def check_attention_supported(self):
        if getattr(self.model.config, "reorder_and_upcast_attn", False):
            raise UnsupportedModel("--quantize-attention: GPT-2 with reorder_and_upcast_attn=True is not supported")
