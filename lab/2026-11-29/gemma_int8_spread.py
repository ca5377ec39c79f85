"""Spread of valid CPU arithmetics of one W8A8 SmoothQuant Q/DQ graph on Gemma-3-270m (ran 2026-11-30 00:21-00:34 UTC, CPU).

Question: TensorRT 8.6 INT8 engine vs ONNX Runtime on the default-recipe Gemma SQ graph: top-1 0.787 (0.843 with
--no-fp16), logits cosine 0.987, ppl 888.9 vs ORT 963.5 (SmolLM2: top-1 0.956). Is that inside the spread between
two *correct* arithmetics of the same static-INT8 model (rounding flips at the activation quantizers compounding over
layers)? Measured here, on CPU, on the device's token protocol (4 chunks x 256 held-out tokens, BOS on chunk 1 only):

  * ORT_DISABLE_ALL: ONNX Runtime with graph optimizations off (Q/DQ runs as QuantizeLinear -> float
    DequantizeLinear -> float MatMul);
  * ORT_ENABLE_ALL: the default session (Q/DQ fused into integer kernels, MatMulInteger / QLinear*);
  * torch (optional, --torch): the PyTorch fake-quant model from the same recipe/calibration (`sq-export eval` path).

Per arithmetic: perplexity with sq_export.measure.perplexity.PerplexityAccumulator over the same scored tokens as
`sq-export compare --perplexity` (each chunk's tokens 1..n-1 from the ones before); between each pair: mean / min
per-position logits cosine and top-1 agreement, with sq_export.engine.compare._Stats (compare's own metric code).

Commands (run 2026-11-30 from /tmp/gemma_spread, CPU only, 2 cores):
    PYTHONPATH=/work/main python -m sq_export -q export gemma3-270m --weights qdq -o g.sq.onnx --samples 16 --device cpu
    PYTHONPATH=/work/main python -m sq_export tokens gemma3-270m -o t.npz --seq-len 256 --max-tokens 1024
    PYTHONPATH=/work/main python /work/main/lab/2026-11-29/gemma_int8_spread.py g.sq.onnx t.npz [--torch]
        # -> lab/2026-11-29/logs6/gemma_int8_spread.log
Wall times (2 CPU cores): export 4 min 27 s; tokens 20 s; this script with --torch 4 min 31 s (ORT off 26 s, ORT on
18 s, torch recalibrate + quantize 138 s + 4 chunks). Results: logs6/gemma_int8_spread.log. Note: this CPU export keeps
2 Linears in float (124 INT8, 5,728 nodes); the device's GPU-calibrated export had 126 INT8 (5,773 nodes), and the
device's perplexities (float ORT 899.7) are ~13x the CPU ones here (float PyTorch 66.33 on the same 4 x 256 tokens).
Logits of each arithmetic are cached as <graph>.<name>.logits.npy beside the graph (float32 [4, 256, V]) so the
--torch pass can be compared without rerunning ONNX Runtime.
"""
import argparse
import itertools
import json
import os
import time

import numpy as np

from sq_export.engine.compare import _Stats
from sq_export.engine.run import load_tokens
from sq_export.measure.perplexity import PerplexityAccumulator

ap = argparse.ArgumentParser()
ap.add_argument("graph")
ap.add_argument("tokens")
ap.add_argument("--torch", action="store_true", help="also the PyTorch fake-quant model (recalibrated: --samples 16)")
ap.add_argument("--model", default="gemma3-270m")
a = ap.parse_args()

tok = load_tokens(a.tokens)
ids, lengths = tok.input_ids, tok.lengths
print(f"tokens: {a.tokens} {list(ids.shape)} lengths {lengths.tolist()} first ids {ids[:, 0].tolist()}", flush=True)


def cache(name):
    return f"{a.graph}.{name}.logits.npy"


def ort_logits(level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    so.enable_mem_pattern = False
    t = time.perf_counter()
    s = ort.InferenceSession(a.graph, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    build = time.perf_counter() - t
    out = []
    for c, n in zip(ids, lengths):
        c = c[:n]
        feed = {"input_ids": c[None].astype(np.int64), "attention_mask": np.ones((1, len(c)), np.int64)}
        out.append(s.run(["logits"], {k: v for k, v in feed.items() if k in names})[0][0].astype(np.float32))
    del s
    return np.stack(out), {"ort_version": ort.__version__, "session_s": round(build, 1)}


def torch_logits():
    import torch

    from sq_export import api
    from sq_export.cli import build_parser
    from sq_export.commands import _common as c

    args = build_parser().parse_args(["export", a.model, "--weights", "qdq", "-o", "/dev/null", "--samples", "16",
                                      "--device", "cpu"])
    recipe = c.recipe_from(args)
    model, tk, _ = c.load(args)
    t = time.perf_counter()
    qm = api.quantize(model, recipe=recipe, tokenizer=tk, source=args.model)
    q_s = time.perf_counter() - t
    m = qm.model
    out = []
    with torch.no_grad():
        for cc, n in zip(ids, lengths):
            x = torch.as_tensor(cc[:n])[None]
            out.append(m(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float().numpy())
    info = {"torch_version": torch.__version__, "recipe": recipe.describe(), "alpha": qm.prepared.alpha,
            "quantized_layers": len(qm.prepared.quantized), "quantize_s": round(q_s, 1),
            "dtype": str(next(m.parameters()).dtype), "attn": getattr(m.config, "_attn_implementation", None)}
    return np.stack(out), info


runs = ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"] + (["torch"] if a.torch else [])
res = {}
for name in runs:
    t = time.perf_counter()
    info = {}
    if os.path.exists(cache(name)):
        lg = np.load(cache(name), mmap_mode="r")
        info["cached"] = True
    else:
        lg, info = ort_logits(name) if name.startswith("ORT") else torch_logits()
        np.save(cache(name), lg)
    acc = PerplexityAccumulator()
    for b in range(len(ids)):
        n = int(lengths[b])
        acc.add(lg[b, :n], ids[b, :n])
    res[name] = {"perplexity": round(acc.perplexity, 3), "tokens": acc.tokens, "seconds": round(time.perf_counter() - t, 1), **info}
    print(name, json.dumps(res[name]), flush=True)
    del lg

valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]
pairs = {}
for x, y in itertools.combinations(runs, 2):
    st = _Stats()
    rx, ry = np.load(cache(x), mmap_mode="r"), np.load(cache(y), mmap_mode="r")
    for b in range(len(ids)):  # one chunk at a time (float64 copies of [256, 262144] inside _Stats)
        st.add(np.asarray(rx[b : b + 1]), np.asarray(ry[b : b + 1]), valid[b : b + 1])
    r = st.result()
    pairs[f"{x} vs {y}"] = {k: r[k] for k in ("cosine", "cosine_min", "top1", "max_abs", "mean_abs", "positions")}
    print(f"{x} vs {y}", json.dumps(pairs[f"{x} vs {y}"]), flush=True)
print(json.dumps({"runs": res, "pairs": pairs}))
