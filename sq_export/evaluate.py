"""Perplexity through PyTorch or ONNX Runtime, with the chunking of sq_export.ppl (the engine side uses it too)."""

from __future__ import annotations

import numpy as np

from sq_export import progress
from sq_export.ppl import PerplexityAccumulator, chunk_tokens


def torch_perplexity(model, ids: np.ndarray, seq_len: int = 512, max_tokens: int | None = None, desc="eval") -> dict:
    import torch

    acc = PerplexityAccumulator()
    with torch.no_grad():
        for c in progress.bar(chunk_tokens(ids, seq_len, max_tokens), desc=desc, unit="chunk"):
            x = torch.as_tensor(c)[None]
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
            acc.add(logits.float().numpy(), c)
    return {"perplexity": acc.perplexity, "tokens": acc.tokens}


def ort_session(path: str, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # no memory pattern: with it the arena grows by another activation-sized block on later runs (SmolLM2 SQ
    # graph, 512-token chunks: 663 -> 798 MB after two runs; without: 663 MB flat), same speed and same outputs
    so.enable_mem_pattern = False
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_perplexity(path: str, ids: np.ndarray, seq_len: int = 512, max_tokens: int | None = None) -> dict:
    sess = ort_session(path)
    acc = PerplexityAccumulator()
    for c in progress.bar(chunk_tokens(ids, seq_len, max_tokens), desc="eval (onnxruntime)", unit="chunk"):
        x = c[None].astype(np.int64)
        logits = sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0]
        acc.add(logits, c)
    return {"perplexity": acc.perplexity, "tokens": acc.tokens}
