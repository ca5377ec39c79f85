"""Perplexity: the arithmetic shared by every backend (PyTorch, ONNX Runtime, TensorRT), the PyTorch loop and
the one ONNX Runtime session factory.

Torch-free: the engine side computes perplexity with exactly these functions, so numbers from different
backends differ only by their logits. Chunking: the token stream (as the tokenizer returns it for the whole
text: one BOS at the start if the tokenizer adds one) is cut into non-overlapping chunks of `seq_len`; each
chunk predicts its tokens 1..n-1 from the ones before; a last partial chunk of at least 2 tokens counts too.
"""

from __future__ import annotations

import math

import numpy as np

from sq_export import progress


def chunk_tokens(ids, seq_len: int, max_tokens: int | None = None) -> list[np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    return [c for c in chunks if len(c) >= 2]


ROWS = 64  # logits rows per block in chunk_nll


def chunk_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood (float64) of ids[1:] under logits[:-1], and the token count.

    logits: [L, V] (any float dtype), ids: [L]. Computed in blocks of ROWS positions: every value is a function of
    its own row only, so the result is bit-identical to doing all rows at once, without float64 copies of the whole
    [L, V] logits (512 × 49152: three 200 MB temporaries before).
    """
    tgt = np.asarray(ids[1:], dtype=np.int64)
    n = len(tgt)
    nll = np.empty(n, dtype=np.float64)
    for i in range(0, n, ROWS):
        lg = np.asarray(logits[i : min(i + ROWS, n)], dtype=np.float64)
        m = lg.max(axis=-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1))
        nll[i : i + len(lg)] = lse - lg[np.arange(len(lg)), tgt[i : i + len(lg)]]
    return float(nll.sum()), int(n)


class PerplexityAccumulator:
    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0

    def add(self, logits: np.ndarray, ids: np.ndarray) -> None:
        s, n = chunk_nll(logits, ids)
        self.nll += s
        self.tokens += n

    @property
    def perplexity(self) -> float:
        if self.tokens == 0:
            return float("nan")
        return math.exp(self.nll / self.tokens)

def torch_perplexity(model, ids: np.ndarray, seq_len: int = 512, max_tokens: int | None = None, desc="eval") -> dict:
    import torch

    from sq_export.device import fits, model_device

    dev = model_device(model)
    acc = PerplexityAccumulator()
    with torch.no_grad(), fits(f"an eval chunk of {seq_len} tokens", dev):
        for c in progress.bar(chunk_tokens(ids, seq_len, max_tokens), desc=desc, unit="chunk"):
            x = torch.as_tensor(c)[None].to(dev)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
            acc.add(logits.float().cpu().numpy(), c)
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
    from sq_export.onnxio.read import skeleton_beside

    with skeleton_beside(path, ".ort.onnx") as skeleton:
        if skeleton is not None:
            try:
                return ort.InferenceSession(skeleton, so, providers=["CPUExecutionProvider"])
            except Exception:  # e.g. a small initializer that shape inference must read (Unsqueeze axes): the file
                pass
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_perplexity(path: str, ids: np.ndarray, seq_len: int = 512, max_tokens: int | None = None) -> dict:
    """Perplexity of an ONNX graph through ONNX Runtime, chunked as `torch_perplexity` (the engine side's loop,
    sq_export.engine.run.model_perplexity, one chunk per run)."""
    from sq_export.engine.run import Tokens, model_perplexity

    r = model_perplexity(path, Tokens.from_chunks(chunk_tokens(ids, seq_len, max_tokens), "<text>"), desc="eval (onnxruntime)")
    return {"perplexity": r["perplexity"], "tokens": r["predicted_tokens"]}
