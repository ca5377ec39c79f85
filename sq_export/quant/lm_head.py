"""Opt-in W8A8 LM head (`export --quantize-lm-head`): the vocabulary projection as one more QLinear.

By default the LM head stays float (the paper's recipe). It is also the largest single matmul of a small model:
SmolLM2-135M's 576 × 49,152 head is a fifth of its Linear multiply-adds, and on ONNX Runtime the float head is
what keeps the INT8 graph's prefill short of 2× the FP32 graph (docs/ONNX.md). Quantizing it:

- activations: static per-tensor INT8 of the head's input (the final norm's output), the scale from max|x| over
  the recipe's calibration windows run through the prepared (smoothed, quantized) model, as the Linears' scales;
- weights: INT8 per output channel (one scale per vocabulary row), stored [K, N] like every QLinear;
- smoothing (mode sq): s_j = max|x_j|^α / max|W_:j|^(1-α) as for the decoder's norms, folded into the final
  norm's γ (and β) and into the head's own copy of the weight. The head usually shares its weight with the input
  embedding (SmolLM2, OPT, GPT-2, BLOOM); the QLinear holds a copy, so the embedding's Gather keeps the float
  table untouched and the head is stored once, as INT8 (the float graph stores the tied table twice: Gather's
  table and the transposed MatMul weight). The final norm is found as the norm module whose output is the base
  model's last hidden state; where there is none (OPT with project_out) the head is quantized without smoothing.
"""

from __future__ import annotations


import torch

from sq_export.device import model_device
from sq_export.errors import BadInput


def _scaled(t: torch.Tensor, s: torch.Tensor, divide: bool = False) -> torch.Tensor:
    """A new tensor t·s (t/s): float32 weights as before; half ones computed in float32, rounded once."""
    s = s.to(t.device)
    if t.dtype == torch.float32:
        return t / s if divide else t * s
    return (t.float() / s if divide else t.float() * s).to(t.dtype)


def lm_head_name(model) -> str:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise BadInput(f"--quantize-lm-head: the model's output embedding is {type(head).__name__}, not a Linear")
    for name, mod in model.named_modules():
        if mod is head:
            return name
    raise BadInput("--quantize-lm-head: the LM head is not a submodule of the model")


def _final_norm(model, body, batch) -> str | None:
    """Name of the norm module whose output is the base model's last hidden state (the head's input), or None."""
    outs, hooks = {}, []
    for name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower() and isinstance(getattr(mod, "weight", None), torch.Tensor):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: outs.__setitem__(n, o)))
    try:
        batch = batch.to(model_device(model))
        x = body(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)[0]
    finally:
        for h in hooks:
            h.remove()
    found = [n for n, o in outs.items() if isinstance(o, torch.Tensor) and o.shape == x.shape and torch.equal(o, x)]
    return found[-1] if found else None


@torch.no_grad()
def quantize_lm_head(model, batches, batch_size: int = 4, per_channel: bool = True, alpha: float | None = None,
                     norm_form: str = "gamma") -> dict:
    """Calibrate the LM head's input on `batches` ([n, L] token ids) and swap the head for a static QLinear;
    with `alpha`, smooth it first (into the final norm and the head's own weight copy). `norm_form`: how the final
    norm applies its weight (Family.norm_form: "gamma", or "one_plus_gamma" for Gemma)."""
    from sq_export.modeling import check_plain_norm
    from sq_export.quant.qlinear import QLinear, replace_module, scale_from_amax
    from sq_export.quant.smooth import divided_norm_weight, smoothing_factors

    name = lm_head_name(model)
    head = model.get_submodule(name)
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise BadInput("--quantize-lm-head: the model has no base model in front of its LM head")
    amax = torch.zeros(head.in_features)
    ids = torch.as_tensor(batches)
    dev = model_device(model)
    # the base model's last hidden state is what the head reads (every family applies its final norm, and OPT its
    # project_out, inside the base model); running the body alone skips [batch, seq, vocab] logits per batch
    for i in range(0, len(ids), batch_size):
        b = ids[i : i + batch_size].to(dev)
        x = body(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)[0]
        if i == 0 and x.shape[-1] != head.in_features:
            raise BadInput(f"--quantize-lm-head: the base model returns width {x.shape[-1]}, the head takes {head.in_features}")
        amax = torch.maximum(amax, x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu())
    if not torch.isfinite(amax).all() or float(amax.max()) <= 0:
        raise BadInput(f"--quantize-lm-head: the LM head's input range is {float(amax.max())} on the calibration windows")
    norm = _final_norm(model, body, ids[:1]) if alpha is not None else None
    src = head
    if norm is not None:
        s = smoothing_factors(amax, [head.weight.detach()], alpha)  # float32, CPU
        src = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        src.weight = torch.nn.Parameter(_scaled(head.weight.detach(), s.view(1, -1)), requires_grad=False)
        if head.bias is not None:
            src.bias = torch.nn.Parameter(head.bias.detach().clone(), requires_grad=False)
        nm = model.get_submodule(norm)  # new tensors: the norm's may be shared with another copy of the model
        check_plain_norm(nm, norm, norm_form)
        w = nm.weight.detach()
        nm.weight = torch.nn.Parameter(divided_norm_weight(w.float(), s.to(w.device), norm_form).to(w.dtype), requires_grad=False)
        if getattr(nm, "bias", None) is not None:
            nm.bias = torch.nn.Parameter(_scaled(nm.bias.detach(), s, divide=True), requires_grad=False)
        amax = amax / s
    scale = float(scale_from_amax(amax.max()))
    replace_module(model, name, QLinear(src, "static", scale, per_channel))
    return {"name": name, "act_scale": scale, "smoothed_into": norm, "alpha": alpha if norm is not None else None}

