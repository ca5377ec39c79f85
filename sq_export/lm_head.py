"""Opt-in W8A8 LM head (`export --quantize-lm-head`): the vocabulary projection as one more QLinear.

By default the LM head stays float (the paper's recipe). It is also the largest single matmul of a small model:
SmolLM2-135M's 576 × 49,152 head is a fifth of its Linear multiply-adds, and on ONNX Runtime the float head is
what keeps the INT8 graph's prefill short of 2× the FP32 graph (docs/ONNX.md). Quantizing it:

- activations: static per-tensor INT8 of the head's input (the final norm's output), the scale from max|x| over
  the recipe's calibration windows run through the prepared (smoothed, quantized) model, as the Linears' scales;
- weights: INT8 per output channel (one scale per vocabulary row), stored [K, N] like every QLinear;
- no smoothing: the head usually shares its weight with the input embedding (SmolLM2, OPT, GPT-2, BLOOM), so a
  smoothing factor folded into its columns would change the embedding too. The QLinear copies the weight, so
  the embedding's Gather keeps the float table and the head is stored once, as INT8 (the float graph stores
  the tied table twice: Gather's table and the transposed MatMul weight).
"""

from __future__ import annotations

import time

import torch

from sq_export.errors import BadInput


def lm_head_name(model) -> str:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise BadInput(f"--quantize-lm-head: the model's output embedding is {type(head).__name__}, not a Linear")
    for name, mod in model.named_modules():
        if mod is head:
            return name
    raise BadInput("--quantize-lm-head: the LM head is not a submodule of the model")


@torch.no_grad()
def quantize_lm_head(model, batches, batch_size: int = 4, per_channel: bool = True) -> dict:
    """Calibrate the LM head's input on `batches` ([n, L] token ids) and swap the head for a static QLinear."""
    from sq_export.quantize import QLinear, replace_module, scale_from_amax

    name = lm_head_name(model)
    head = model.get_submodule(name)
    amax = torch.zeros(())

    def hook(mod, inputs):
        nonlocal amax
        amax = torch.maximum(amax, inputs[0].detach().abs().amax().float())

    h = head.register_forward_pre_hook(hook)
    try:
        ids = torch.as_tensor(batches)
        for i in range(0, len(ids), batch_size):
            b = ids[i : i + batch_size]
            model(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)
    finally:
        h.remove()
    if not torch.isfinite(amax) or float(amax) <= 0:
        raise BadInput(f"--quantize-lm-head: the LM head's input range is {float(amax)} on the calibration windows")
    scale = float(scale_from_amax(amax))
    replace_module(model, name, QLinear(head, "static", scale, per_channel))
    return {"name": name, "act_scale": scale}


def apply_for_recipe(model, tokenizer, recipe) -> dict:
    """After `prepare(...)`: the W8A8 head on the recipe's calibration windows. Returns metadata."""
    from sq_export.attention import calibration_batches

    c = recipe.calib
    t = time.perf_counter()
    batches = calibration_batches(tokenizer, c.calib_text, c.samples, c.seq_len)
    r = quantize_lm_head(model, batches, c.batch_size, recipe.per_channel)
    return {"quantize_lm_head": r["name"], "lm_head_calibrate_s": round(time.perf_counter() - t, 1)}
