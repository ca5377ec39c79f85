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
(tests/test_stream.py, every family), for the logits graph and the KV-cache decode graph (`export_onnx(decode=True)`).

The float graph of a Hugging Face safetensors folder is exported the same way (`load_float_lazy`, the skeleton the
quantized one builds on): `--mode fp --stream`, no quantization and no DIR. Each lazy weight records the type its
checkpoint stores it in (the safetensors header's), so the compact float graph (`--weights qdq16`,
passes/float_weights_fp16.py) knows a float16 checkpoint's weights are exact in float16 without reading them.

    qm = api.load_quantized(folder, lazy=True)
    api.export_onnx(qm, "sq16.onnx", weights="qdq16")
    api.export_onnx(api.load_float(hf_folder, lazy=True), "fp16w.onnx", weights="qdq16")
"""

from __future__ import annotations

from pathlib import Path

import torch

from sq_export.stream.checkpoint import Checkpoint

PLACEHOLDER_MIN_ELEMENTS = 1 << 20  # tensors of 4 MB (float32) and more: fresh zero pages; smaller ones: zeros
STORED_TYPES = {"F16": "FLOAT16", "BF16": "BFLOAT16", "F32": "FLOAT", "F64": "DOUBLE"}  # safetensors -> ir.DataType


class LazyWeights:
    """Which placeholder storage is which checkpoint tensor: {storage pointer: (checkpoint name, placeholder)}."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.by_storage: dict[int, tuple[str, torch.Tensor]] = {}
        self.real_storages: set[int] = set()  # the model's real tensors (norms, biases, scales, buffers)
        self.transforms: dict[int, tuple] = {}  # derived placeholders: {storage pointer: (source view, function)}

    def captured(self, t: torch.Tensor, name: str):
        """What the exporter's captured parameter `t` becomes: an ir.LazyTensor of the checkpoint's values when it is
        a placeholder or a view of one, None when it is one of the model's real tensors (kept as it is). A large
        float tensor the exporter computed itself (constant folding) from placeholders would be written with
        placeholder values: refused."""
        src = self.source_of(t)
        if src is not None:
            import onnx_ir as ir

            from sq_export.passes.float_weights_fp16 import SOURCE_DTYPE

            lt = ir.LazyTensor(lambda: ir.Tensor(self.real(t).numpy(), name=name), dtype=ir.DataType.FLOAT,
                               shape=ir.Shape(tuple(t.shape)), name=name)
            # the type the checkpoint stores it in (its header's; no data read): a float16 one is exact in float16,
            # which the compact float graph (--mode fp --weights qdq16) then knows without reading it
            derived = src[1].untyped_storage().data_ptr() in self.transforms
            stored = None if derived else STORED_TYPES.get(self.ckpt.stored_dtype(src[0]))
            if stored is not None:
                lt.meta[SOURCE_DTYPE] = getattr(ir.DataType, stored)
            return lt
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

    def derived(self, src: torch.Tensor, fn, tag: str) -> torch.Tensor:
        """A placeholder of `src`'s shape whose values are fn(the values of placeholder (view) `src`), computed when
        it is read (`real`): a weight the model uses transformed (--rotate-down's Rᵀ·W), still one tensor in memory
        at a time. Its checkpoint type is not recorded (the transformed values are not the stored ones)."""
        name, _ = self.source_of(src)
        t = self.placeholder(f"{name}:{tag}", tuple(src.shape))
        self.transforms[t.untyped_storage().data_ptr()] = (src, fn)
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
        d = self.transforms.get(ph.untyped_storage().data_ptr())
        base = d[1](self.real(d[0])).float().contiguous() if d else self.ckpt.tensor(name, "cpu", torch.float32)
        if base.shape != ph.shape:
            raise RuntimeError(f"{name}: checkpoint shape {list(base.shape)} != placeholder {list(ph.shape)}")
        off = t.storage_offset() - ph.storage_offset()
        return base.as_strided(t.shape, t.stride(), base.storage_offset() + off).contiguous()


    def seal(self, model) -> None:
        """Record the model's real tensors (everything that is not a placeholder), once the model is complete: a
        large float initializer outside them and the placeholders was computed by the exporter (`captured`)."""
        for t in (*model.parameters(), *model.buffers()):
            if self.source_of(t) is None:
                self.real_storages.add(t.untyped_storage().data_ptr())


def _skeleton(folder: str | Path):
    """(model of `folder`'s config.json on the CPU in float32, LazyWeights): every weight matrix a placeholder, the
    small tensors read from the checkpoint (widened to float32 as `load_model` does), weights tied."""
    from sq_export.stream.layers import build_skeleton

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
    return model, lw


def load_float_lazy(folder: str | Path):
    """(float model with placeholder weights and real small tensors, family, LazyWeights): a Hugging Face
    safetensors folder's model on the CPU in float32 for the export of its float graph (api.load_float(lazy=True))."""
    from sq_export.families import family_for

    model, lw = _skeleton(folder)
    lw.seal(model)
    return model, family_for(model), lw


def load_lazy(folder: str | Path, rec: dict):
    """(model with placeholder weights and real small tensors, family, LazyWeights, quantized names): the model of a
    `quantize_streamed` folder on the CPU in float32 (the float skeleton of `load_float_lazy`), its QLinears built
    with the scales in `rec` (sq_quant.json) and their weight scales computed from the checkpoint's weights, one at
    a time."""
    from sq_export.quant.qlinear import quantize_model, weight_scale
    from sq_export.stream.quantize import act_scales_of, recipe_from_json, rotation_of

    model, fam, lw = load_float_lazy(folder)
    recipe = recipe_from_json(rec["recipe"])
    quantized = quantize_model(model, rec["quantized"], recipe.act, act_scales_of(rec), recipe.per_channel)
    rot = rotation_of(rec)
    if rot is not None:  # --rotate-down: each rotated QLinear's weight a placeholder of Rᵀ·W, computed when written
        from sq_export.quant.hadamard import block_rotate, rotate_qlinear

        names, h = rot
        for n in names:
            q = model.get_submodule(n)
            w = lw.derived(q.w_kn, lambda w_kn, h=h: block_rotate(w_kn.t(), h).t(), "rotated")
            rotate_qlinear(q, h, recipe.per_channel, w_kn=w)
    # the scales QLinear computed from the placeholder, now from the real weight; each tensor opens and closes its
    # file (Checkpoint.reading() would keep every page read mapped: the checkpoint's size in RSS)
    for n in quantized:
        q = model.get_submodule(n)
        q.w_scale.copy_(weight_scale(lw.real(q.w_kn), recipe.per_channel))
    lw.seal(model)  # the QLinears' own tensors too
    return model, fam, lw, quantized
