"""Issue 17 (2026-11-29 19:3x UTC): ONNX Runtime perplexity of a Q/DQ graph with graph optimizations off (QDQ runs
as float DequantizeLinear -> MatMul, no integer kernels) beside the default session (QDQ fused into integer kernels).

    PYTHONPATH=. python lab/2026-11-29/export_decided.py 'kinds:{"mlp.up_proj": 0.8}' /tmp/up08.onnx --no-ppl
    PYTHONPATH=. python lab/2026-11-29/ort_noopt.py /tmp/up08.onnx 8192     # logs4/ort_noopt_up08.log
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort

from sq_export import api
from sq_export.measure.perplexity import PerplexityAccumulator, chunk_tokens
from sq_export.textdata import token_ids

path, max_tokens = sys.argv[1], int(sys.argv[2])
tok = api.load_tokenizer("smollm2")
ids = np.array(token_ids(tok, None, "eval"))
res = {}
for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    acc = PerplexityAccumulator()
    t = time.perf_counter()
    for c in chunk_tokens(ids, 512, max_tokens):
        feed = {"input_ids": c[None].astype(np.int64), "attention_mask": np.ones((1, len(c)), np.int64)}
        logits = s.run(["logits"], {k: v for k, v in feed.items() if k in names})[0][0]
        acc.add(logits, c)
    res[level] = {"perplexity": acc.perplexity, "tokens": acc.tokens, "seconds": round(time.perf_counter() - t, 1)}
    print(level, res[level], flush=True)
print(json.dumps(res))
