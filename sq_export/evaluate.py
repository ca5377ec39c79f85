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
    # Given the file itself, ONNX Runtime parses every initializer's bytes into the ModelProto and then copies each
    # into a tensor of its own, so both copies are resident while the session is built (SmolLM2 FP32 graph: RSS
    # +1053 MiB building the session, +1160 MiB after the first 512-token run). Given a skeleton whose initializers
    # point into the file it reads each initializer once, straight into its tensor (+650 and +970 MiB; the INT8
    # graphs +308/+833 instead of +592/+1006 MiB), in half the time. Same graph, same weights, same kernels: the
    # logits are bit-identical. Without a skeleton (a file onnx_read declines, a read-only folder): the file.
    from sq_export.onnx_read import skeleton_beside

    with skeleton_beside(path, ".ort.onnx") as skeleton:
        return ort.InferenceSession(skeleton or str(path), so, providers=["CPUExecutionProvider"])


def onnx_perplexity(path: str, ids: np.ndarray, seq_len: int = 512, max_tokens: int | None = None) -> dict:
    sess = ort_session(path)
    acc = PerplexityAccumulator()
    for c in progress.bar(chunk_tokens(ids, seq_len, max_tokens), desc="eval (onnxruntime)", unit="chunk"):
        x = c[None].astype(np.int64)
        logits = sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0]
        acc.add(logits, c)
    return {"perplexity": acc.perplexity, "tokens": acc.tokens}
