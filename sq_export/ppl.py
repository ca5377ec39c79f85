"""Perplexity arithmetic shared by every backend (PyTorch, ONNX Runtime, TensorRT).

Torch-free: the engine side computes perplexity with exactly these functions, so numbers from different
backends differ only by their logits. Chunking: the token stream (as the tokenizer returns it for the whole
text: one BOS at the start if the tokenizer adds one) is cut into non-overlapping chunks of `seq_len`; each
chunk predicts its tokens 1..n-1 from the ones before; a last partial chunk of at least 2 tokens counts too.
"""

from __future__ import annotations

import math

import numpy as np


def chunk_tokens(ids, seq_len: int, max_tokens: int | None = None) -> list[np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    return [c for c in chunks if len(c) >= 2]


def chunk_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood (float64) of ids[1:] under logits[:-1], and the token count.

    logits: [L, V] (any float dtype), ids: [L].
    """
    lg = np.asarray(logits[:-1], dtype=np.float64)
    tgt = np.asarray(ids[1:], dtype=np.int64)
    m = lg.max(axis=-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1)))
    nll = lse - lg[np.arange(len(tgt)), tgt]
    return float(nll.sum()), int(len(tgt))


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
