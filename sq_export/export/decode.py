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
import os
from pathlib import Path

import numpy as np
import torch

from sq_export.errors import BadInput
from sq_export.export.exporter import OPSET, torchscript_export
from sq_export.kvcache import _as_set, agreement, greedy, input_names, output_names, past_names, position_ids_for  # noqa: F401 (re-exported)


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


def uses_position_ids(family) -> bool:
    return family.name != "bloom"








def torch_export_decode(model, family, path: Path, opset: int = OPSET) -> dict:
    n, kvh, hd = cache_shape(model)
    wrapper = DecodeWrapper(model, n, uses_position_ids(family)).eval()
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


def export_decode_onnx(model, family, path, *, weights: str = "int8", target: str = "tensorrt", meta: dict | None = None) -> dict:
    """sq_export.export.exporter.export_onnx (same passes, metadata and atomic write) for the KV-cache decode graph."""
    from sq_export.export.exporter import export_onnx

    def exporter(m, fam, raw):
        shape = torch_export_decode(m, fam, raw)
        return {"graph": "decode", **{f"decode_{k}": v for k, v in shape.items()}}

    return export_onnx(model, family, path, weights=weights, target=target, meta=meta, exporter=exporter)


# --- greedy decoding -------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_torch(model, ids: np.ndarray, max_new_tokens: int, eos_token_id=None) -> np.ndarray:
    """Greedy decoding with the HF model and its KV cache (prefill, then one token per step). ids: [b, s]."""
    from transformers import DynamicCache

    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    mask = torch.ones_like(x)
    cache = DynamicCache()
    step_in = x
    out = []
    for _ in range(max_new_tokens):
        pos = torch.as_tensor(position_ids_for(mask.numpy(), step_in.shape[1]))
        kw = {} if getattr(model.config, "model_type", "") == "bloom" else {"position_ids": pos}
        res = model(input_ids=step_in, attention_mask=mask, past_key_values=cache, use_cache=True, **kw)
        cache = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        step_in = nxt
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        if eos_token_id is not None and x.shape[0] == 1 and int(nxt) in _as_set(eos_token_id):
            break
    return torch.cat(out, dim=1).numpy()


def greedy_onnx(session, ids: np.ndarray, max_new_tokens: int, eos_token_id=None, pad_slots: int = 0) -> np.ndarray:
    """Greedy decoding through a decode graph in ONNX Runtime (`session` from sq_export.measure.perplexity.ort_session).
    pad_slots: start from that many masked zero cache slots instead of an empty cache (what TensorRT engines
    whose profile starts at past length 1 need; the tokens must not change)."""
    inputs = {i.name: i for i in session.get_inputs()}
    pasts = past_names(inputs)
    if "input_ids" not in inputs or not pasts:
        raise BadInput("this ONNX is not a decode graph (no past_key_values inputs): export it with `sq-export export --decode`")
    shp = inputs[pasts[0]].shape
    kvh, hd = shp[1], shp[3]
    if not (isinstance(kvh, int) and isinstance(hd, int)):
        raise BadInput("decode graph's past_key_values have no static head count / head size")
    n_layers = len(pasts) // 2
    outs = output_names(n_layers)

    def step(feed):
        res = session.run(outs, {k: v for k, v in feed.items() if k in inputs})
        return dict(zip(outs, res))

    return greedy(step, ids, max_new_tokens, n_layers=n_layers, kv_heads=kvh, head_dim=hd, eos_token_id=eos_token_id, pad_slots=pad_slots)


def token_agreement(model_a, model_b, prompts_ids: list[np.ndarray], max_new_tokens: int = 16) -> dict:
    """How often greedy tokens of `model_b` (e.g. INT8) equal those of `model_a` (e.g. FP) over held-out prompts.

    `model_a` / `model_b`: HF models (PyTorch) or callables ids -> tokens. Reports per-position agreement (%),
    the mean length of the common prefix (tokens before the first divergence) and exact-match prompts."""
    def run(m, ids):
        return m(ids, max_new_tokens) if callable(m) and not isinstance(m, torch.nn.Module) else greedy_torch(m, ids, max_new_tokens)

    prompts = [np.asarray(ids, dtype=np.int64).reshape(1, -1) for ids in prompts_ids]
    ref = [run(model_a, ids)[0] for ids in prompts]
    got = [run(model_b, ids)[0] for ids in prompts]
    return {**agreement(ref, got), "new_tokens": max_new_tokens}


def heldout_prompts(tokenizer, n: int = 8, prompt_tokens: int = 32, text_path=None) -> list[np.ndarray]:
    """`n` prompts from the held-out split: the first `prompt_tokens` tokens of evenly spaced long paragraphs."""
    from sq_export.textdata import read_text

    paras = [p.strip() for p in read_text(text_path, "eval").splitlines() if len(p.strip()) > 300]
    if len(paras) < n:
        raise BadInput(f"the held-out text has only {len(paras)} paragraphs over 300 characters; need {n}")
    step = len(paras) // n
    return [np.asarray(tokenizer(paras[i * step])["input_ids"][:prompt_tokens], dtype=np.int64) for i in range(n)]


def heldout_agreement(model: str = "smollm2", mode: str = "sq", prompts: int = 8, prompt_tokens: int = 32, max_new_tokens: int = 16, samples: int = 64, seq_len: int = 512, quantize_attention: bool = False, smooth_pairs: bool = False, alpha=None) -> dict:
    """Greedy-token agreement of the fake-quantized model (mode naive/sq) with the float model on held-out prompts."""
    from sq_export.families import family_for
    from sq_export.modeling import load_model
    from sq_export.quant.prepare import prepare
    from sq_export.quant.recipe import CalibOptions, Recipe

    fp, tok, _ = load_model(model)
    q, _, _ = load_model(model)
    fam = family_for(q)
    recipe = Recipe(mode=mode, alpha=alpha, linear_pairs=smooth_pairs, calib=CalibOptions(None, samples, seq_len, 4))
    prep = prepare(q, tok, fam, recipe)
    if quantize_attention:
        from sq_export.quant.attention import apply_for_recipe

        apply_for_recipe(q, fam, tok, recipe)
    res = token_agreement(fp, q, heldout_prompts(tok, prompts, prompt_tokens), max_new_tokens)
    return {"model": model, "mode": mode, "alpha": prep.alpha, "smooth_pairs": smooth_pairs, "quantize_attention": quantize_attention, "calibration": f"{samples}x{seq_len}", "prompt_tokens": prompt_tokens, **res}


if __name__ == "__main__":  # python -m sq_export.export.decode smollm2 --mode sq --prompts 8 --new-tokens 16
    import argparse
    import json

    ap = argparse.ArgumentParser(description="greedy-token agreement of W8A8 fake quantization with float on held-out prompts")
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--mode", default="sq", choices=["naive", "sq"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--quantize-attention", action="store_true")
    ap.add_argument("--smooth-pairs", action="store_true")
    ap.add_argument("--alpha", default=None, help="a number in [0,1] or auto (default: the family's)")
    a = ap.parse_args()
    from sq_export import progress

    progress.QUIET = True
    torch.set_num_threads(int(os.environ.get("SQ_THREADS", "2")))
    print(json.dumps(heldout_agreement(a.model, a.mode, a.prompts, a.prompt_tokens, a.new_tokens, a.samples, a.calib_seq_len, a.quantize_attention, a.smooth_pairs, a.alpha if a.alpha in (None, "auto") else float(a.alpha)), sort_keys=True))
