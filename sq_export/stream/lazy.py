"""Export a layer-streamed result without its weights in memory: trace on placeholders, write from the checkpoint.

`quantize_streamed` leaves a smoothed checkpoint and its scales (sq_quant.json); exporting it through
`load_quantized` holds the whole model in float32 (a 7B model: 27 GB of host memory, docs/BIG_MODELS.md). Here the
model is built from config.json with every weight matrix a *placeholder*: float32 memory that is reserved but never
written (fresh anonymous pages read as zeros and take no resident memory; sq_export.memory's fixed mmap threshold
puts every tensor of 4 MB and more there), the small tensors (norms, biases, buffers) and every QLinear's scales
real. The TorchScript trace runs on the placeholders — the graph's structure does not depend on weight values —
and the exporter's captured parameters that are (views of) placeholders become `ir.LazyTensor`s that read their
tensor from the checkpoint (widened to float32 exactly as `load_model` does) when the writer reaches them, one at a
time. The qdq16/int8 weight passes keep their inputs lazy too. The file has the bytes of the in-memory export
(tests/test_stream.py, every family).

    qm = api.load_quantized(folder, lazy=True)
    api.export_onnx(qm, "sq16.onnx", weights="qdq16")
"""

from __future__ import annotations

from pathlib import Path

import torch

from sq_export.stream.checkpoint import Checkpoint

PLACEHOLDER_MIN_ELEMENTS = 1 << 20  # tensors of 4 MB (float32) and more: fresh zero pages; smaller ones: zeros


class LazyWeights:
    """Which placeholder storage is which checkpoint tensor: {storage pointer: (checkpoint name, placeholder)}."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.by_storage: dict[int, tuple[str, torch.Tensor]] = {}
        self.real_storages: set[int] = set()  # the model's real tensors (norms, biases, scales, buffers)

    def captured(self, t: torch.Tensor, name: str):
        """What the exporter's captured parameter `t` becomes: an ir.LazyTensor of the checkpoint's values when it is
        a placeholder or a view of one, None when it is one of the model's real tensors (kept as it is). A large
        float tensor the exporter computed itself (constant folding) from placeholders would be written with
        placeholder values: refused."""
        if self.source_of(t) is not None:
            import onnx_ir as ir

            return ir.LazyTensor(lambda: ir.Tensor(self.real(t).numpy(), name=name), dtype=ir.DataType.FLOAT,
                                 shape=ir.Shape(tuple(t.shape)), name=name)
        if (t.is_floating_point() and t.dim() >= 2 and t.numel() >= 1024
                and t.untyped_storage().data_ptr() not in self.real_storages):
            raise RuntimeError(f"export from placeholders: the exporter computed initializer {name} {list(t.shape)} "
                               "from the weights (constant folding); export this model with load_quantized(lazy=False)")
        return None

    def placeholder(self, name: str, shape) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        t = torch.empty(tuple(shape), dtype=torch.float32) if n >= PLACEHOLDER_MIN_ELEMENTS else torch.zeros(tuple(shape))
        # one distinct element each (one page touched): the exporter deduplicates initializers of equal values,
        # and all-zero placeholders of one shape would otherwise be merged into one
        t.view(-1)[0] = float(len(self.by_storage) + 1)
        self.by_storage[t.untyped_storage().data_ptr()] = (name, t)
        return t

    def source_of(self, t: torch.Tensor):
        """(checkpoint name, placeholder) when `t` is a placeholder or a view of one, else None."""
        try:
            return self.by_storage.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return None

    def real(self, t: torch.Tensor) -> torch.Tensor:
        """The checkpoint's values of placeholder (view) `t`, float32, contiguous, in `t`'s shape."""
        name, ph = self.source_of(t)
        base = self.ckpt.tensor(name, "cpu", torch.float32)
        if base.shape != ph.shape:
            raise RuntimeError(f"{name}: checkpoint shape {list(base.shape)} != placeholder {list(ph.shape)}")
        off = t.storage_offset() - ph.storage_offset()
        return base.as_strided(t.shape, t.stride(), base.storage_offset() + off).contiguous()


def load_lazy(folder: str | Path, rec: dict):
    """(model with placeholder weights and real small tensors, LazyWeights, quantized names): the model of a
    `quantize_streamed` folder on the CPU in float32, its QLinears built with the scales in `rec` (sq_quant.json)
    and their weight scales computed from the checkpoint's weights, one at a time."""
    from sq_export.families import family_for
    from sq_export.quant.qlinear import quantize_model, weight_scale
    from sq_export.stream.layers import build_skeleton
    from sq_export.stream.quantize import recipe_from_json

    model = build_skeleton(folder, torch.float32)
    ckpt = Checkpoint(folder, getattr(model, "base_model_prefix", None)).use_renames_of(model)
    lw = LazyWeights(ckpt)
    for mod_name, sub in model.named_modules():
        pre = f"{mod_name}." if mod_name else ""
        for kind in ("_parameters", "_buffers"):
            for pname, t in list(getattr(sub, kind).items()):
                if t is None:
                    continue
                full = pre + pname
                if ckpt.key(full) is None:  # a tied weight (tie_weights below) or a computed buffer (rotary)
                    continue
                if t.device.type == "meta" and t.is_floating_point() and t.dim() >= 2:
                    v = lw.placeholder(full, t.shape)
                else:
                    v = ckpt.tensor(full, "cpu", torch.float32 if t.is_floating_point() else None)
                getattr(sub, kind)[pname] = torch.nn.Parameter(v, requires_grad=False) if kind == "_parameters" else v
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        from sq_export.errors import BadInput

        raise BadInput(f"{folder}: the checkpoint has no tensor {left[0]} (is it complete?)")
    fam = family_for(model)
    recipe = recipe_from_json(rec["recipe"])
    quantized = quantize_model(model, rec["quantized"], recipe.act, {n: float(v) for n, v in rec["act_scales"].items()},
                               recipe.per_channel)
    # the scales QLinear computed from the placeholder, now from the real weight; each tensor opens and closes its
    # file (Checkpoint.reading() would keep every page read mapped: the checkpoint's size in RSS)
    for n in quantized:
        q = model.get_submodule(n)
        q.w_scale.copy_(weight_scale(lw.real(q.w_kn), recipe.per_channel))
    for t in (*model.parameters(), *model.buffers()):
        if lw.source_of(t) is None:
            lw.real_storages.add(t.untyped_storage().data_ptr())
    return model, fam, lw, quantized
