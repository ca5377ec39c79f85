"""mit-han-lab/smoothquant's smoothing (smoothquant/smooth.py, MIT licence, Copyright (c) 2022 MIT HAN Lab),
reproduced as the reference our implementation must equal given the same act scales and alpha.
Only the module-class checks were dropped (the tests pass the right modules)."""

import torch


@torch.no_grad()
def smooth_ln_fcs(ln, fcs, act_scales, alpha=0.5):
    if not isinstance(fcs, list):
        fcs = [fcs]
    device, dtype = fcs[0].weight.device, fcs[0].weight.dtype
    act_scales = act_scales.to(device=device, dtype=dtype)
    weight_scales = torch.cat([fc.weight.abs().max(dim=0, keepdim=True)[0] for fc in fcs], dim=0)
    weight_scales = weight_scales.max(dim=0)[0].clamp(min=1e-5)
    scales = (act_scales.pow(alpha) / weight_scales.pow(1 - alpha)).clamp(min=1e-5).to(device).to(dtype)
    ln.weight.div_(scales)
    if getattr(ln, "bias", None) is not None:  # smooth_llama_like_ln_fcs is the same without the bias
        ln.bias.div_(scales)
    for fc in fcs:
        fc.weight.mul_(scales.view(1, -1))


@torch.no_grad()
def smooth_lm(model, scales, alpha=0.5):
    mt = model.config.model_type
    if mt == "opt":
        for i, layer in enumerate(model.model.decoder.layers):
            name = f"model.decoder.layers.{i}"
            qkv = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
            smooth_ln_fcs(layer.self_attn_layer_norm, qkv, scales[name + ".self_attn.q_proj"], alpha)
            smooth_ln_fcs(layer.final_layer_norm, layer.fc1, scales[name + ".fc1"], alpha)
    elif mt == "bloom":
        for i, layer in enumerate(model.transformer.h):
            name = f"transformer.h.{i}"
            smooth_ln_fcs(layer.input_layernorm, layer.self_attention.query_key_value, scales[name + ".self_attention.query_key_value"], alpha)
            smooth_ln_fcs(layer.post_attention_layernorm, layer.mlp.dense_h_to_4h, scales[name + ".mlp.dense_h_to_4h"], alpha)
    elif mt in ("llama", "mistral"):
        for i, layer in enumerate(model.model.layers):
            name = f"model.layers.{i}"
            qkv = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
            smooth_ln_fcs(layer.input_layernorm, qkv, scales[name + ".self_attn.q_proj"], alpha)
            smooth_ln_fcs(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], scales[name + ".mlp.gate_proj"], alpha)
    else:
        raise NotImplementedError(mt)
