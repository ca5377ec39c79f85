"""The float-equivalence check of smoothing, decoder layer by decoder layer, computed in float32.

Smoothing is exact in math: every decoder layer must compute the same function after its folds. A float32 model is
checked on its logits (sq_export.quant.smooth.check_unchanged: 1e-3 of the logit scale). A half model cannot be
checked that way: its logits carry its own arithmetic rounding (a bfloat16 model is ~2e-2 of the logit scale from
itself in float32 on the tiny models), as large as what a wrong fold does in some families (BLOOM: 0.10). So a
half model — and a layer-streamed one, whose logits never exist — is checked per layer instead: each decoder
layer's output on the check batch's inputs to that layer (recorded once, before smoothing) is computed with the
layer's weights widened to float32, before and after its folds, and the change must stay below LAYER_TOLERANCE of
the layer's own contribution max|out − in| (the residual stream is not part of the scale). In float32 arithmetic
the only difference left is the rounding of the folded weights to the model's type (2^-9 relative in bfloat16),
while a wrong fold changes the layer's contribution by O(1) (numbers in LAYER_TOLERANCE's comment).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from sq_export.decoder_layers import hidden_of, layer_input, recording_calls, replay_kwargs
from sq_export.errors import SmoothingChangedOutputs

log = logging.getLogger(__name__)

# max |Δ layer output| / max |layer output − layer input|, per model type. Measured on the tiny models of every
# family, norm and pair folds (tests/test_device.py::test_layer_check_separates_correct_from_wrong_folds,
# 2026-11-29): correct folds ≤ 8.0e-7 in float32, ≤ 1.34e-2 in bfloat16, ≤ 1.6e-3 in float16; a wrong fold (one
# norm divided by s, its Linears not multiplied) ≥ 0.455 in every type. The tolerances sit in between: float32
# 1e-4, float16 1e-2 (6x over, 45x under), bfloat16 6e-2 (4.5x over, 7.6x under).
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _float32(x):
    """Floating tensors (in tuples, lists, dicts) as float32; everything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if type(x) in (tuple, list):
        return type(x)(_float32(v) for v in x)
    if isinstance(x, dict):
        return {k: _float32(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def widened(module):
    """`module`'s floating parameters and buffers in float32 (same device) while the block runs, then exactly its
    own tensors again (`.data` swapped: ties and the modules' identity kept). A float32 module passes through."""
    swapped, seen = [], set()
    try:
        for t in (*module.parameters(), *module.buffers()):
            if id(t) in seen or not t.is_floating_point() or t.dtype == torch.float32 or t.device.type == "meta":
                continue
            seen.add(id(t))
            swapped.append((t, t.data))
            t.data = t.data.float()
        yield module
    finally:
        for t, data in swapped:
            t.data = data


@torch.no_grad()
def layer_output_f32(layer, args: tuple, kwargs: dict) -> torch.Tensor:
    """The layer's hidden-state output on (args, kwargs), computed in float32 (its weights widened for the call)."""
    with widened(layer):
        return hidden_of(layer(*_float32(args), **_float32(kwargs))).float()


def layer_change(ref: torch.Tensor, new: torch.Tensor, h_in: torch.Tensor) -> float:
    """max |new − ref| / max |ref − h_in| (h_in: the layer's input hidden states)."""
    scale = float((ref - h_in.float()).abs().max())
    return float((new - ref).abs().max()) / max(scale, 1e-30)


def check_layer_unchanged(ref: torch.Tensor, new: torch.Tensor, h_in: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    d = layer_change(ref, new, h_in)
    tol = LAYER_TOLERANCE.get(dtype, LAYER_TOLERANCE[torch.float32])
    if not d <= tol:
        raise SmoothingChangedOutputs(
            f"smoothing changed {what}'s output by {d:.3g} of its contribution (tolerance {tol:.3g} for "
            f"{str(dtype).removeprefix('torch.')} weights): the fold is not exact for this model; nothing was written")
    return d


@torch.no_grad()
def record_layer_inputs(model, family, batch: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) each decoder layer is called with when `model` runs on `batch` (ids [n, L])."""
    from sq_export.device import to_device

    with recording_calls(model.get_submodule(family.layers_path)) as got:
        b = to_device(batch, model)
        getattr(model, "base_model", model)(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)
    return got


@torch.no_grad()
def layer_outputs_f32(model, family, inputs) -> list[torch.Tensor]:
    """Each decoder layer's float32 output on its recorded inputs (the weights as they are now, widened)."""
    from sq_export.dispatch import resident

    from sq_export.quant.prefix import installed

    layers = model.get_submodule(family.layers_path)
    pre = installed(model)
    out = []
    for i, (a, k) in enumerate(inputs):
        kw = replay_kwargs(k, pre, layer_input(a, k).shape[0])
        if kw is None:
            raise RuntimeError(f"decoder layer {i} was called with a KV cache that no outlier prefix explains: cannot replay it")
        with resident(model, [f"{family.layers_path}.{i}"], write=False, recurse=True):
            out.append(layer_output_f32(layers[i], a, kw))
    return out


def smooth_checked_per_layer(model, family, act_max, alpha, check_batch, *, linear_pairs=False):
    """apply_smoothing + the per-layer float32 check (half models). Returns (factors, max relative change)."""
    from sq_export.device import model_dtype
    from sq_export.quant.smooth import apply_smoothing

    dtype = model_dtype(model)
    inputs = record_layer_inputs(model, family, check_batch)
    ref = layer_outputs_f32(model, family, inputs)
    factors = apply_smoothing(model, family, act_max, alpha, linear_pairs=linear_pairs)
    new = layer_outputs_f32(model, family, inputs)
    worst = 0.0
    for i, (r, n, (a, k)) in enumerate(zip(ref, new, inputs)):
        worst = max(worst, check_layer_unchanged(r, n, layer_input(a, k), dtype, f"decoder layer {i}"))
    log.info("smoothing: max per-layer change %.3g (%s, tolerance %.3g)", worst, dtype, LAYER_TOLERANCE.get(dtype, 0))
    return factors, worst
