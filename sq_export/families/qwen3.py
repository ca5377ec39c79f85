from sq_export.families import register
from sq_export.families.llama import Llama


@register
class Qwen3(Llama):
    """transformers' Qwen3ForCausalLM: Llama's layout plus a per-head RMSNorm on q and on k (q_norm, k_norm) after
    the projections. Those two norms are left untouched, and exactly so: smoothing divides q/k/v_proj's input by s
    and multiplies their input columns by s, so q_proj and k_proj compute the same outputs as before (in float
    math) and q_norm / k_norm see the same tensors; the norm that smoothing folds into is input_layernorm."""

    name = "qwen3"
    model_types = ("qwen3",)
