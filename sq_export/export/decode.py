"""Decode graph: one ONNX that serves prefill (past length 0) and token-by-token decoding with a float KV cache.

Inputs   input_ids [b, s] int64, attention_mask [b, past+s] int64, position_ids [b, s] int64,
         past_key_values.{i}.key / .value [b, kv_heads, past, head_dim] float32 (past may be 0)
Outputs  logits [b, s, vocab], present.{i}.key / .value [b, kv_heads, past+s, head_dim]

Every family, BLOOM included, keeps [b, kv_heads, seq, head_dim] per layer in transformers 5's DynamicCache (BLOOM's
old fused [b*h, d, s] layout is gone), so one wrapper fits all: it builds a DynamicCache from the flat tensors, runs
the HF model, and returns the updated cache flat. TorchScript exporter, opset 17, like the logits-only graph;
the Linears' (and with --quantize-attention the attention MatMuls') Q/DQ are the same, the cache stays float.
BLOOM derives positions from attention_mask (alibi) and ignores position_ids; the input is kept (a zero-weight
use) so every decode graph has the same interface.

position_ids follow Hugging Face generate: cumsum(attention_mask) - 1 (1 where masked), last s columns.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sq_export.export.exporter import OPSET, torchscript_export
from sq_export.kvcache import input_names, output_names, position_ids_for


class DecodeWrapper(torch.nn.Module):
    def __init__(self, model, num_layers: int, uses_position_ids: bool = True):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.uses_position_ids = uses_position_ids

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        kw = {"position_ids": position_ids} if self.uses_position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, **kw)
        logits = out.logits
        if not self.uses_position_ids:  # keep the input in the graph: an exact zero, folded by TensorRT
            logits = logits + (position_ids[:, :, None] * 0).to(logits.dtype)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (logits, *flat)


def cache_shape(model) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) as the model's own cache holds them."""
    with torch.no_grad():
        ids = torch.zeros(1, 1, dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    layers = out.past_key_values.layers
    k = layers[0].keys
    return len(layers), int(k.shape[1]), int(k.shape[3])




def torch_export_decode(model, family, path: Path, opset: int = OPSET) -> dict:
    n, kvh, hd = cache_shape(model)
    wrapper = DecodeWrapper(model, n, family.position_ids).eval()
    g = torch.Generator().manual_seed(0)
    b, s, past = 2, 3, 5
    ids = torch.randint(0, max(2, model.config.vocab_size), (b, s), generator=g)
    mask = torch.ones(b, past + s, dtype=torch.long)
    pos = torch.as_tensor(position_ids_for(mask.numpy(), s))
    pkv = [torch.randn(b, kvh, past, hd, generator=g) * 0.5 for _ in range(2 * n)]
    ins, outs = input_names(n), output_names(n)
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"}, "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for name in ins[3:]:
        dyn[name] = {0: "batch", 2: "past_sequence"}
    for name in outs[1:]:
        dyn[name] = {0: "batch", 2: "total_sequence"}
    with contextlib.ExitStack() as stack:
        for patch in family.export_patches:
            stack.enter_context(patch(model))
        with torch.no_grad():
            torchscript_export(wrapper, (ids, mask, pos, *pkv), path, opset_version=opset, input_names=ins, output_names=outs, dynamic_axes=dyn)
    return {"num_layers": n, "kv_heads": kvh, "head_dim": hd}


PREFIX_INIT = "prefix_outliers.{i}.{kv}"  # the decode graph's initial past (outlier prefix), [1, kv_heads, P, head_dim]


def export_decode_onnx(model, family, path, *, weights: str = "int8", target: str = "tensorrt", meta: dict | None = None,
                       prefix=None) -> dict:
    """sq_export.export.exporter.export_onnx (same passes, metadata and atomic write) for the KV-cache decode graph.

    `prefix` (sq_export.quant.prefix.OutlierPrefix, the one the model runs after): the graph itself is the plain
    decode graph (traced without the prefix); the prefix's float KV cache is stored in the file as initializers
    PREFIX_INIT that no node reads: the initial past. A runtime starts from it (sq_export.kvcache.greedy(prefix=)):
    past = the prefix, attention mask = P ones before the prompt's, positions from the mask (the prompt starts at
    P); `sq-export check` lints shapes and count (passes/prefix_kv.py)."""
    from sq_export.export.exporter import export_onnx
    from sq_export.quant import prefix as prefix_mod

    def exporter(m, fam, raw):
        with prefix_mod.applied(m, None):
            shape = torch_export_decode(m, fam, raw)
        return {"graph": "decode", **{f"decode_{k}": v for k, v in shape.items()}}

    constants = None
    if prefix is not None:
        constants = {}
        for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
            constants[PREFIX_INIT.format(i=i, kv="key")] = k.detach().float().cpu().contiguous().numpy()
            constants[PREFIX_INIT.format(i=i, kv="value")] = v.detach().float().cpu().contiguous().numpy()
    return export_onnx(model, family, path, weights=weights, target=target, meta=meta, exporter=exporter, constants=constants)


def read_prefix(path) -> dict | None:
    """{past input name: [1, kv_heads, P, head_dim] array} of a decode graph exported with an outlier prefix (its
    PREFIX_INIT initializers), or None."""
    import onnx
    from onnx import numpy_helper

    from sq_export.kvcache import PAST_PREFIX
    from sq_export.onnxio.meta import read_metadata

    if not read_metadata(path).get("prefix_length"):
        return None
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if t.name.startswith("prefix_outliers."):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                from onnx.external_data_helper import load_external_data_for_tensor

                load_external_data_for_tensor(t, str(Path(path).parent))
            i, kv = t.name.split(".")[1:3]
            out[f"{PAST_PREFIX}{i}.{kv}"] = numpy_helper.to_array(t)
    return out or None
