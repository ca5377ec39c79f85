"""`--quantize-attention`: static per-tensor INT8 fake quantization of both attention batched matmuls.

Q·Kᵀ gets Q/DQ on q and on kᵀ, P·V on the softmax output P and on v, each directly on the MatMul input (TensorRT's
fused-MHA Q/DQ placement: the DQ feeds the MatMul; no op between them). q, k and v scales are calibrated like the
Linears' inputs (max|x| / 127 over the calibration windows, of the model as prepared, i.e. after smoothing and the
Linears' fake quantization); P ∈ [0, 1] uses the fixed scale 1/127 (its calibrated max is recorded too).

Families whose attention goes through transformers' AttentionInterface (Llama / Mistral / Qwen2 / Qwen3, Phi-3,
GPT-NeoX, Gemma 3, GLM, OPT, GPT-2): a function registered there under ATTN_IMPL (same math as their eager
functions, GQA's repeat_kv, the model's own score scaling and optional softcap included) reads the scales from
attributes on the attention module, and `config._attn_implementation` is switched to it (the mask interface gets
the eager mask under the same name; sliding-window layers get their sliding mask from it like the eager path). A
family that computes attention itself (BLOOM: alibi, baddbmm) gives its own forward with the same quantization
points (`Family.attention_forward`); `Family.attention_module` names the module.

    scales = calibrate_attention(model, family, batches)   # {attention module name: {"q","k","v","p"} scales}
    enable_attention_quant(model, scales)                    # fake-quant from now on (PyTorch and ONNX export)
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F

from sq_export.quant.calibrate import run_decoder
from sq_export.errors import UnsupportedModel
from sq_export.quant.qlinear import QMAX, QMIN

ATTN_IMPL = "sq_int8_eager"
P_SCALE = 1.0 / 127.0
_STATE = "_sq_attn"  # module attribute: {"q","k","v","p": float scale} (quantize) or {"collect": dict} (calibrate)


def _fq(x: torch.Tensor, scale: float) -> torch.Tensor:
    if x.dtype != torch.float32:  # float16 export: in float32 between Casts, as QLinear (sq_export.passes.fp16_qdq)
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, 0, QMIN, QMAX).to(x.dtype)
    return torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)


def _observe(st: dict, key: str, x: torch.Tensor) -> torch.Tensor:
    """Calibrating: record max|x|; quantizing: fake-quant with the static scale; otherwise: pass through."""
    if st is None:
        return x
    if "collect" in st:
        m = float(x.detach().abs().amax())
        st["collect"][key] = max(st["collect"].get(key, 0.0), m)
        return x
    return _fq(x, st[key])


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sq_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers' eager attention (the llama/glm/opt/gpt2/qwen3/phi3/gpt_neox/gemma3 variants agree on inference)
    with INT8 points. `scaling` is the model's own (Gemma 3: query_pre_attn_scalar**-0.5, not head_dim**-0.5);
    `softcap` (Gemma 2 style tanh capping of the scores) applies as in the eager function when the model passes it
    (Gemma 3's attention does not pass one); `sliding_window` needs nothing here: the sliding-window mask arrives
    in `attention_mask`."""
    st = getattr(module, _STATE, None)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key = _repeat_kv(key, n_rep)
    value = _repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    q = _observe(st, "q", query)
    kt = _observe(st, "k", key.transpose(-1, -2))
    attn_weights = torch.matmul(q, kt) * scaling
    if softcap is not None:
        attn_weights = torch.tanh(attn_weights / softcap) * softcap
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    p = _observe(st, "p", attn_weights)
    v = _observe(st, "v", value)
    attn_output = torch.matmul(p, v).transpose(1, 2).contiguous()
    return attn_output, attn_weights



def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPL, sq_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, eager_mask)


def attention_modules(model, family) -> dict[str, torch.nn.Module]:
    rel = family.attention_module
    if rel is None:
        from sq_export.families import family_classes

        ok = sorted(c.name for c in family_classes() if c.attention_module)
        raise UnsupportedModel(f"--quantize-attention: family {family.name} has no attention adapter (supported: {', '.join(ok)})")
    family.check_attention_supported()
    return {family.layer_prefix(i) + rel: model.get_submodule(family.layer_prefix(i) + rel) for i in range(family.num_layers())}


def _install(model, family) -> dict[str, torch.nn.Module]:
    mods = attention_modules(model, family)
    fwd = family.attention_forward()
    if fwd is not None:
        for m in mods.values():
            m.forward = types.MethodType(fwd, m)
    else:
        register()
        for cfg in {id(c): c for c in _configs(model)}.values():
            cfg._attn_implementation = ATTN_IMPL
    return mods


def _configs(model):
    yield model.config
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            yield c


@torch.no_grad()
def calibrate_attention(model, family, batches, batch_size: int = 4) -> dict[str, dict[str, float]]:
    """max|x| / 127 of q, kᵀ, v (and P's max, reported) at every layer's attention over `batches` ([n, L] ids)."""
    mods = _install(model, family)
    stats = {n: {} for n in mods}
    for n, m in mods.items():
        setattr(m, _STATE, {"collect": stats[n]})
    try:
        run_decoder(model, batches, batch_size)
    finally:
        for m in mods.values():
            setattr(m, _STATE, None)
    out = {}
    for n, s in stats.items():
        if not all(math.isfinite(v) for v in s.values()):
            raise UnsupportedModel(f"attention activations at {n} hold NaN/Inf during calibration")
        out[n] = {k: max(s[k], 1e-8) / 127.0 for k in ("q", "k", "v")}
        out[n]["p"] = P_SCALE
        out[n]["p_amax"] = s.get("p", 0.0)
    return out


def enable_attention_quant(model, scales: dict[str, dict[str, float]], family=None) -> None:
    """Fake-quantize q, kᵀ, P, v with the static `scales` from now on."""
    from sq_export.families import family_for

    family = family or family_for(model)
    mods = _install(model, family)
    missing = [n for n in mods if n not in scales]
    if missing:
        raise UnsupportedModel(f"attention scales missing for {missing[0]} ({len(missing)} of {len(mods)} layers)")
    for n, m in mods.items():
        setattr(m, _STATE, {k: float(scales[n][k]) for k in ("q", "k", "v", "p")})


def quantize_attention(model, family, batches, batch_size: int = 4) -> dict:
    """calibrate_attention + enable_attention_quant; returns the scales."""
    scales = calibrate_attention(model, family, batches, batch_size)
    enable_attention_quant(model, scales, family)
    return scales
