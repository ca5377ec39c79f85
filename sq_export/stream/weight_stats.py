"""Per-input-channel max|W| of every quantized Linear of one or more model folders (the original checkpoint and its
smoothed one), one decoder layer at a time: what the report's weight plot needs, without loading a whole model.

    before, after = weight_channel_max([folder, smoothed], device, dtype)   # each {Linear name: [in] float32}

Each folder's layer i is loaded (LayerStream.load), its Linears measured as the whole-model smooth stage measures
them (modeling.abs_max over weight_oi), and freed before layer i+1: peak memory ≈ one layer per folder + the
embedding parts.
"""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def weight_channel_max(folders: list[str | Path], device=None, dtype="auto") -> list[dict]:
    from sq_export import progress
    from sq_export.modeling import abs_max, weight_oi
    from sq_export.stream.calibrate import layer_linears, open_stream

    streams = []
    try:
        for f in folders:
            streams.append(open_stream(f, device, dtype))
        n_layers = streams[0].num_layers
        out: list[dict] = [{} for _ in streams]
        for i in progress.bar(range(n_layers), desc="weight statistics (streamed)", unit="layer"):
            for ls, d in zip(streams, out):
                layer = ls.load(i)
                pre = ls.family.layer_prefix(i)
                for n in layer_linears(ls.family, i):
                    d[n] = abs_max(weight_oi(layer.get_submodule(n[len(pre):])), 0).float().cpu()
                ls.free(i)
        return out
    finally:
        for ls in streams:
            ls.close()
