"""Greedy generation through PyTorch (HF KV cache) and a decode graph in ONNX Runtime, and how often two models'
greedy tokens agree on held-out prompts."""

from __future__ import annotations

import os

import numpy as np
import torch

from sq_export.errors import BadInput
from sq_export.kvcache import _as_set, agreement, greedy, output_names, past_names, position_ids_for



@torch.no_grad()
def greedy_torch(model, ids: np.ndarray, max_new_tokens: int, eos_token_id=None) -> np.ndarray:
    """Greedy decoding with the HF model and its KV cache (prefill, then one token per step). ids: [b, s]."""
    from transformers import DynamicCache

    from sq_export.device import model_device

    dev = model_device(model)
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(dev)
    mask = torch.ones_like(x)
    cache = DynamicCache()
    step_in = x
    out = []
    for _ in range(max_new_tokens):
        pos = torch.as_tensor(position_ids_for(mask.cpu().numpy(), step_in.shape[1])).to(dev)
        kw = {} if getattr(model.config, "model_type", "") == "bloom" else {"position_ids": pos}
        res = model(input_ids=step_in, attention_mask=mask, past_key_values=cache, use_cache=True, **kw)
        cache = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        step_in = nxt
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        if eos_token_id is not None and x.shape[0] == 1 and int(nxt) in _as_set(eos_token_id):
            break
    return torch.cat(out, dim=1).cpu().numpy()


def greedy_onnx(session, ids: np.ndarray, max_new_tokens: int, eos_token_id=None, pad_slots: int = 0, prefix: dict | None = None) -> np.ndarray:
    """Greedy decoding through a decode graph in ONNX Runtime (`session` from sq_export.measure.perplexity.ort_session).
    pad_slots: start from that many masked zero cache slots instead of an empty cache (what TensorRT engines
    whose profile starts at past length 1 need; the tokens must not change). `prefix`: the graph's outlier prefix
    (sq_export.export.decode.read_prefix(path)), its initial past."""
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

    return greedy(step, ids, max_new_tokens, n_layers=n_layers, kv_heads=kvh, head_dim=hd, eos_token_id=eos_token_id,
                  pad_slots=pad_slots, prefix=prefix)


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
    from sq_export import api
    from sq_export.quant.recipe import CalibOptions, make_recipe

    fp, tok = api.load_model(model)
    recipe = make_recipe("paper" if mode == "sq" else mode, alpha=alpha, linear_pairs=smooth_pairs,
                         quantize_attention=quantize_attention, calib=CalibOptions(None, samples, seq_len, 4))
    qm = api.quantize(fp, recipe=recipe, tokenizer=tok, copy=True)
    prep = qm.prepared
    res = token_agreement(fp, qm.model, heldout_prompts(tok, prompts, prompt_tokens), max_new_tokens)
    return {"model": model, "mode": mode, "alpha": prep.alpha, "smooth_pairs": smooth_pairs, "quantize_attention": quantize_attention, "calibration": f"{samples}x{seq_len}", "prompt_tokens": prompt_tokens, **res}


if __name__ == "__main__":  # python -m sq_export.measure.generate smollm2 --mode sq --prompts 8 --new-tokens 16
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
