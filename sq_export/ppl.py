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
