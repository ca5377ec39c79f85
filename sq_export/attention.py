"""`--quantize-attention`: static per-tensor INT8 fake quantization of both attention batched matmuls.

Q·Kᵀ gets Q/DQ on q and on kᵀ, P·V on the softmax output P and on v, each directly on the MatMul input (TensorRT's
fused-MHA Q/DQ placement: the DQ feeds the MatMul; no op between them). q, k and v scales are calibrated like the
Linears' inputs (max|x| / 127 over the calibration windows, of the model as prepared, i.e. after smoothing and the
Linears' fake quantization); P ∈ [0, 1] uses the fixed scale 1/127 (its calibrated max is recorded too).

Llama / Mistral / Qwen2 / Qwen3, Phi-3, GPT-NeoX, Gemma 3, GLM, OPT and GPT-2 route attention through transformers'
AttentionInterface: a function registered there under ATTN_IMPL (same math as their eager functions, GQA's repeat_kv,
the model's own score scaling and optional softcap included) reads the scales from attributes on the attention
module, and `config._attn_implementation` is switched to it (the mask interface gets the eager mask under the same
name; sliding-window layers get their sliding mask from it like the eager path). BLOOM computes attention itself (alibi, baddbmm): its attention modules
get an instance forward with the same quantization points.

    scales = calibrate_attention(model, family, batches)   # {attention module name: {"q","k","v","p"} scales}
    enable_attention_quant(model, scales)                    # fake-quant from now on (PyTorch and ONNX export)
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F

from sq_export.calibrate import run_decoder
from sq_export.errors import UnsupportedModel
from sq_export.quantize import QMAX, QMIN

ATTN_IMPL = "sq_int8_eager"
P_SCALE = 1.0 / 127.0
# attention module of each decoder layer, relative to the layer
ATTN_MODULE = {"llama": "self_attn", "glm": "self_attn", "opt": "self_attn", "gpt2": "attn", "bloom": "self_attention",
               "gemma3": "self_attn", "qwen3": "self_attn", "phi3": "self_attn", "gpt_neox": "attention"}
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


def _bloom_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False, output_attentions=False, **kwargs):
    """BloomAttention.forward (transformers 5) with the four INT8 points; pretraining_tp slicing not supported."""
    from transformers.models.bloom.modeling_bloom import dropout_add

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


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPL, sq_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, eager_mask)


def attention_modules(model, family) -> dict[str, torch.nn.Module]:
    rel = ATTN_MODULE.get(family.name)
    if rel is None:
        raise UnsupportedModel(f"--quantize-attention: family {family.name} has no attention adapter (supported: {', '.join(sorted(ATTN_MODULE))})")
    if family.name == "bloom" and getattr(model.config, "pretraining_tp", 1) > 1 and getattr(model.config, "slow_but_exact", False):
        raise UnsupportedModel("--quantize-attention: BLOOM with pretraining_tp > 1 and slow_but_exact is not supported")
    if family.name == "gpt2" and getattr(model.config, "reorder_and_upcast_attn", False):
        raise UnsupportedModel("--quantize-attention: GPT-2 with reorder_and_upcast_attn=True is not supported")
    return {family.layer_prefix(i) + rel: model.get_submodule(family.layer_prefix(i) + rel) for i in range(family.num_layers())}


def _install(model, family) -> dict[str, torch.nn.Module]:
    mods = attention_modules(model, family)
    if family.name == "bloom":
        for m in mods.values():
            m.forward = types.MethodType(_bloom_forward, m)
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


def calibration_batches(tokenizer, calib_text=None, samples=512, seq_len=512) -> np.ndarray:
    """The same calibration windows the Linears are calibrated on."""
    from sq_export.textdata import calibration_samples, read_text, tokenize

    return calibration_samples(tokenize(tokenizer, read_text(calib_text, "calib")), samples, seq_len)


def apply_for_recipe(model, family, tokenizer, recipe) -> dict:
    """After `prepare(...)`: calibrate the attention points on the recipe's calibration windows and enable them.
    Returns metadata for the ONNX / JSON output."""
    import time

    c = recipe.calib
    t = time.perf_counter()
    batches = calibration_batches(tokenizer, c.calib_text, c.samples, c.seq_len)
    scales = quantize_attention(model, family, batches, c.batch_size)
    return {"quantize_attention": "static", "attention_layers": len(scales), "attention_calibrate_s": round(time.perf_counter() - t, 1)}
