"""Layer-streamed calibration: the act maxima (and row sample) of every quantized Linear, one decoder layer in
memory at a time, identical to the whole-model pass (sq_export.quant.calibrate.calibrate_ids).

The whole-model path calibrates the float model: each layer's statistics come from the float outputs of the layers
before it. Streaming does the same: each layer's float outputs (before any smoothing or quantization) are the next
layer's inputs. On the CPU in float32 the maxima and the row sample are bit-identical to the whole-model path
(tests/test_stream.py, every family and SmolLM2); on a GPU they agree to float32 reduction order.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sq_export import progress
from sq_export.quant.calibrate import Calibration, act_max_hook, finish_act_max, rows_hook, text_fingerprint
from sq_export.quant.recipe import CalibOptions


def open_stream(folder, device=None, dtype="auto", cache_device=None):
    """A LayerStream on `folder` with the device and type resolved as api.load_model does."""
    from sq_export.device import checkpoint_dtype, resolve_device, resolve_dtype
    from sq_export.modeling import resolve_model_path
    from sq_export.stream.layers import LayerStream

    path = resolve_model_path(str(folder))
    if not path.is_dir():
        from sq_export.errors import BadInput

        raise BadInput(f"streaming reads a Hugging Face folder of safetensors, not {path.name}: save the model once "
                       "with save_pretrained (sq_export.stream.save_for_streaming)")
    dev = resolve_device(device)
    return LayerStream(path, dev, resolve_dtype(dtype, dev, checkpoint_dtype(path)), cache_device)


def layer_linears(family, i: int) -> list[str]:
    pre = family.layer_prefix(i)
    return [n for n in family.quantized_linears() if n.startswith(pre)]


@torch.no_grad()
def calibrate_layer(ls, i: int, layer, stats: dict | None, reservoir=None) -> list[torch.Tensor]:
    """Layer `i`'s Linears' statistics on every cached batch; returns its float outputs (the next inputs). `stats`
    None: the maxima are known (a calibration given), only the row sample is taken (into `reservoir`, when one)."""
    def hook(n):
        return act_max_hook(n, stats, reservoir) if stats is not None else rows_hook(n, reservoir)

    pre = len(ls.family.layer_prefix(i))
    hooks = [layer.get_submodule(n[pre:]).register_forward_pre_hook(hook(n))
             for n in layer_linears(ls.family, i) if stats is not None or reservoir is not None]
    try:
        return ls.forward(i, layer)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def rotated_layer_maxima(ls, i: int, layer, names: list[str], h: torch.Tensor) -> dict[str, float]:
    """max|x·R| of the named Linears' inputs of decoder layer `i` (loaded, as it is now: smoothed) over every cached
    batch, R = diag(h, ..., h): the layer-streamed form of sq_export.quant.hadamard.rotated_maxima. The outputs are
    not kept (the next layer's inputs are the float ones calibrate_layer returned)."""
    from sq_export.quant.hadamard import max_hook

    amax = {n: 0.0 for n in names}
    pre = len(ls.family.layer_prefix(i))
    hooks = [layer.get_submodule(n[pre:]).register_forward_pre_hook(max_hook(amax, n, h)) for n in names]
    try:
        for b in range(len(ls.hidden)):
            args, kw = ls.layer_args(i, b)
            layer(*args, **kw)
    finally:
        for hk in hooks:
            hk.remove()
    return amax


def calibrate_streamed(folder: str | Path, ids: np.ndarray, options: CalibOptions | None = None, *, rows: int | None = None,
                       device=None, dtype="auto", cache_device=None) -> Calibration:
    """`calibrate_ids` for the model in `folder` (a Hugging Face folder of safetensors), streamed layer by layer:
    the same Calibration (act maxima keyed by the loaded model's module names, the row sample when `rows`)."""
    from sq_export.quant.reservoir import new_reservoir
    from sq_export.textdata import calibration_samples

    o = options or CalibOptions()
    o.validate()
    ids = np.asarray(ids)
    batches = calibration_samples(ids, o.samples, o.seq_len)
    t = time.perf_counter()
    ls = open_stream(folder, device, dtype, cache_device)
    try:
        res = new_reservoir(ls.family, rows) if rows else None
        ls.capture(batches, o.batch_size)
        stats: dict = {}
        for i in progress.bar(range(ls.num_layers), desc="calibrate (streamed)", unit="layer"):
            layer = ls.load(i)
            outs = calibrate_layer(ls, i, layer, stats, res)
            ls.free(i)
            ls.advance(outs)
    finally:
        ls.close()
    act = finish_act_max(stats)
    meta = {"samples": o.samples, "calib_seq_len": o.seq_len, "tokens_fingerprint": text_fingerprint(batches),
            "seconds": round(time.perf_counter() - t, 1)}  # the whole-model path's: same act_scales.safetensors bytes
    return Calibration(act, res, ids, o, meta)
